"""Early-exit training (LayerSkip, Elhoushi et al., 2024, arXiv 2404.16710): the model learns to predict the
next token from its first ``layer`` layers too, so that those layers make a self-speculative draft.

In training, the hidden state after layer ``layer`` goes through the model's own final norm and LM head
(``decoder.final_layernorm``, ``output_layer``: the exit ``[tricks.speculative] draft = "layers:N"`` reads
at inference), its cross-entropy is scaled by ``weight`` and added to the gradient of the final loss.
The loss the run records stays the model's own (final-layer) loss, so its curve compares with the
baseline's; the exit's loss is recorded apart (``metrics.extra.early_exit`` and the measure
``exit_validation_loss``: its validation loss, over the same batches as ``validation_loss``). LayerSkip also drops layers at rates rising with depth and spreads
the exit loss over every layer on a curriculum; this is its single-exit form, enough to train the draft
the speculative decoder uses.

What stays the same: with ``weight = 0`` the run is the baseline's, bit for bit (the exit's term adds
zero to every gradient); evaluation, held-out metrics and checkpoints are those of the plain model (the
exit has no parameters of its own).

FLOPs per step: the baseline's plus the exit's final norm and LM head, forward and backward
(3 · 2·B·S·h·V; norms are not counted, as elsewhere).

This module is torch-free (config, FLOPs, validation); ``runtime.py`` holds the hooks.
"""
from __future__ import annotations

from dataclasses import dataclass

from suite import errors, registry
from suite.fields import doc
from suite.metrics import flops as F
from suite.metrics.declare import Metric, declare
from suite.registry import Trick, register

KEY = "tricks.early_exit."
EXIT_LOSS = declare(Metric("exit_validation_loss", "nats/token", "quality", "lower", "mean", paired=True,
                           doc="the early exit's loss on the final validation pass; samples: one per micro-batch "
                               "of this rank's share of the held-out batches"))


@dataclass
class EarlyExitConfig:
    """[tricks.early_exit]"""

    layer: int = doc("Layers before the exit: the first `layer` layers, then the final norm and the LM head "
                     "(what draft = 'layers:N' reads at inference). Required.", range="[1, 4095]")
    weight: float = doc("Scale of the exit's cross-entropy in the gradient, the final loss counting 1 (0: the "
                        "exit is measured, not trained).", 0.5, range="[0, 100]")


def step_flops(shape: F.Shape, batch: int, seq: int) -> int:
    """Training FLOPs of one step: the model's, plus the exit's LM head forward and backward."""
    return F.train_step_flops(shape, batch, seq) + 3 * F.head_forward_flops(shape, batch, seq)


def validate(spec, cfg: EarlyExitConfig) -> None:
    m, p = spec.model, spec.parallel
    if cfg.layer is None:
        errors.fail(spec, KEY + "layer", "layer is required: how many layers run before the exit.",
                    f"write e.g. layer = {max(1, m.num_layers // 4)}.")
    if not 1 <= cfg.layer < m.num_layers:
        errors.fail(spec, KEY + "layer", f"layer {cfg.layer} must be at least 1 and below the model's "
                    f"{m.num_layers} layers (the last layer's exit is the model's own output).",
                    f"use a layer between 1 and {m.num_layers - 1}.")
    if p.pp > 1:
        errors.fail(spec, "parallel.pp", f"the exit after layer {cfg.layer} needs the LM head on the stage "
                    "that holds that layer; with pp > 1 they are on different stages.", "set pp = 1.")
    if p.recompute == "full":
        errors.fail(spec, "parallel.recompute", "full recompute runs the layers' forward without autograd, "
                    "so the exit's loss would not reach them.", 'set recompute = "none" or "selective".')
    # (a technique with a workload of its own is refused beside any runtime by the core's conflict check)
    others = [name for name in spec.tricks if name != "early_exit" and registry.trick(name).runtime]
    if others:
        errors.fail(spec, "tricks", f"early exit and {', '.join(others)} would both count this step's FLOPs "
                    "(each counts the step as if it were the only technique).",
                    "compare the techniques in separate variants.")


def plan_row(spec, cfg: EarlyExitConfig) -> dict:
    """`suite plan`: the exit's LM head in the FLOPs, its logits in the memory."""
    w = spec.workload
    return {"flops_per_step": step_flops(F.Shape.of(spec.model), w.global_batch, w.seq_length),
            "memory": F.logits_bytes(spec)}


def _runtime(spec, cfg):
    from suite.tricks.early_exit.runtime import EarlyExitRuntime

    return EarlyExitRuntime(spec, cfg)


register(Trick(name="early_exit", config=EarlyExitConfig, validate=validate, runtime=_runtime, plan_row=plan_row))
