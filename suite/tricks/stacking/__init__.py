"""Model growth by depth stacking (G_stack; Du et al., 2024, arXiv 2405.15319).

Train a shallow model of L/g layers (the scenario's width, vocabulary and everything else) for
``steps[0]`` steps, stack its whole layer stack g times, layers [l1 … ln, l1 … ln, …] (the paper's
G_stack: the stack repeated, not each layer repeated in place), and train the L-layer model that gives
for ``steps[1]`` steps. Embeddings, the final norm and the output layer carry over unchanged. Each phase
is a fresh megatron-core model, optimizer (state reset) and LR schedule (warm-up, then decay over the
phase's steps), as in the V-cycle (``suite.tricks.multilevel``), whose TP/PP gather and scatter and
training phase the workload reuses.

What the growth step preserves, exactly: every parameter of the grown model is a copy — layer
i + j·n (j < g) of the grown model is layer i of the shallow one, and every parameter outside the
layers is the shallow model's — so the grown network computes final_norm(D^g(embed(x))) where D is the
shallow model's layer stack: the shallow model's blocks applied g times in a row. It does **not**
preserve the shallow model's function final_norm(D(embed(x))) (nor its loss): stacking is an
initialisation that the paper finds trains faster, not a function-preserving expansion (unlike the
V-cycle's de-coalescing). The record keeps the validation loss at the end of the shallow phase and right
after the growth, so the jump is visible.

FLOPs: each step counts its own phase's model (``train_step_flops`` of L/g layers, then of L).

This module is torch-free (config, phase shapes, FLOPs, validation); ``operators.py`` stacks a state
dict, ``workload.py`` runs the two phases.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from suite import errors
from suite.fields import doc
from suite.metrics import flops as F
from suite.registry import Trick, register
from suite.tricks.multilevel import check_phase_lists

KEY = "tricks.stacking."


@dataclass
class StackingConfig:
    """[tricks.stacking]"""

    growth: int = doc("Times the shallow model's layer stack is repeated (g): it has num_layers / g layers; "
                      "the paper's G_stack uses 4.", 4, range="[2, 1024]")
    steps: list[int] | None = doc("Optimizer steps of the two phases: [shallow, grown]. Replaces workload.steps.",
                                  range="[1, 1000000000]")
    lr: list[float] | None = doc("Peak LR of each phase, [shallow, grown] (default: workload.lr for both); each "
                                 "phase's min_lr keeps workload.min_lr's ratio to lr.", range="(0, 100]")


def shallow_model(model, growth: int):
    """The [model] section of the shallow phase: num_layers / growth layers, all else kept."""
    return replace(model, num_layers=model.num_layers // growth)


def phase_models(model, cfg: StackingConfig) -> list:
    return [shallow_model(model, cfg.growth), model]


def phase_spec(spec, cfg: StackingConfig, phase: int):
    """The VariantSpec one phase trains: its depth, steps and LR, no techniques."""
    w = spec.workload
    lr = cfg.lr[phase] if cfg.lr else w.lr
    model = phase_models(spec.model, cfg)[phase]
    workload = replace(w, steps=cfg.steps[phase], lr=lr, min_lr=w.min_lr * lr / w.lr)
    return replace(spec, model=model, workload=workload, tricks={})


def phase_flops(spec, cfg: StackingConfig) -> list[int]:
    """Model FLOPs of each phase: its steps times its own model's training step FLOPs."""
    w = spec.workload
    return [n * F.train_step_flops(F.Shape.of(m), w.global_batch, w.seq_length)
            for n, m in zip(cfg.steps, phase_models(spec.model, cfg))]


def validate(spec, cfg: StackingConfig) -> None:
    def fail(key, message, fix):
        errors.fail(spec, key, message, fix)

    m, p = spec.model, spec.parallel
    if m.init != "random":
        fail("model.init", f"stacking trains its shallow model from scratch; model.init is '{m.init}', a model "
             f"of {m.num_layers} layers, which the {m.num_layers // max(cfg.growth, 1)}-layer first phase cannot load.",
             'set init = "random" or remove [tricks.stacking].')
    check_phase_lists(spec, KEY, cfg.steps, cfg.lr, 2, "shallow, grown", "depth stacking")
    if m.num_layers % cfg.growth:
        fail(KEY + "growth", f"num_layers {m.num_layers} is not divisible by growth {cfg.growth}.",
             "choose a growth factor that divides num_layers.")
    stages = p.pp * (p.vpp or 1)
    if (m.num_layers // cfg.growth) % stages:
        what = f"pp {p.pp}" + (f" x vpp {p.vpp}" if p.vpp else "")
        fail("parallel.pp", f"the shallow model has {m.num_layers // cfg.growth} layers, not divisible by {what}.",
             "lower pp (x vpp) or the growth factor.")


def plan_row(spec, cfg: StackingConfig) -> dict:
    """`suite plan`: the mean step FLOPs over both phases' steps."""
    return {"flops_per_step": sum(phase_flops(spec, cfg)) // sum(cfg.steps)}


register(Trick(name="stacking", config=StackingConfig, validate=validate, workload="suite.tricks.stacking.workload",
               plan_row=plan_row))
