"""Random-LTD: random and layerwise token dropping (Yao et al., 2022, arXiv 2211.11586).

In each *dropping* layer (default: all but the first and the last) every sequence keeps a random,
sorted subset of ``r_t`` token positions; only those go through the layer (attention among them
under the causal mask restricted to them, RoPE at their original positions, then the MLP) and the
others skip the layer unchanged. ``r_t`` grows from ``min_kept`` to the full sequence over
``schedule_steps`` steps in multiples of ``step_size`` (DeepSpeed's ``fixed_linear``):

    r_t = min(S, v − v mod step_size),   v = floor(t / R · (S − r0) + r0)

The LayerToken LR schedule drives warm-up and decay by consumed tokens, counted as layer-tokens / L
(Megatron-DeepSpeed's convention): a step consumes B·(n·r_t + (L−n)·S)/L tokens instead of B·S, and
the schedule's warm-up and decay lengths are the baseline's (in steps) times B·S.

This module is torch-free (config, schedule, FLOPs); ``layer.py`` holds the megatron-core layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from suite.errors import UserError
from suite.metrics import flops as F
from suite.fields import doc
from suite.registry import Trick, register


@dataclass
class RandomLTDConfig:
    """[tricks.random_ltd]"""

    layers: list[int] | None = doc("0-based ids of the dropping layers (default: all but first and last).",
                                   range="[0, 4095]")
    min_kept: int = doc("Kept tokens per sequence at step 0 (r0).", 128, range="[1, 16777216]")
    schedule_steps: int = doc("Steps over which the kept length grows to the full sequence (R).", 1000,
                             range="[1, 1000000000]")
    step_size: int = doc("Kept lengths are multiples of this.", 16, range="[1, 16777216]")
    schedule: str = doc("Kept-length schedule.", "fixed_linear", choices=("fixed_linear", "constant"))
    layer_token_lr: bool = doc("Drive the LR schedule by consumed layer-tokens instead of steps.", True)


def dropping_layers(cfg: RandomLTDConfig, num_layers: int) -> list[int]:
    return list(range(1, num_layers - 1)) if cfg.layers is None else sorted(cfg.layers)


def kept_length(cfg: RandomLTDConfig, step: int, seq: int) -> int:
    """r_t of the fixed_linear schedule (``constant`` keeps min_kept throughout)."""
    if cfg.schedule == "constant":
        return cfg.min_kept
    if step >= cfg.schedule_steps:
        return seq
    v = int(step / cfg.schedule_steps * (seq - cfg.min_kept) + cfg.min_kept)
    return max(1, min(seq, v - v % cfg.step_size))


def layer_tokens(cfg: RandomLTDConfig, step: int, batch: int, seq: int, num_layers: int) -> int:
    """Σ over layers of tokens processed in one step: B·(n·r_t + (L−n)·S)."""
    n = len(dropping_layers(cfg, num_layers))
    return batch * (n * kept_length(cfg, step, seq) + (num_layers - n) * seq)


def step_flops(cfg: RandomLTDConfig, shape: F.Shape, step: int, batch: int, seq: int) -> int:
    """Training FLOPs of one step: dropping layers see r_t tokens (attention r_t²), others S."""
    r = kept_length(cfg, step, seq)
    n = len(dropping_layers(cfg, shape.layers))
    forward = (n * F.layer_forward_flops(shape, batch, r) + (shape.layers - n) * F.layer_forward_flops(shape, batch, seq)
               + F.head_forward_flops(shape, batch, seq))
    return 3 * forward


def validate(spec, cfg: RandomLTDConfig) -> None:
    where = dict(file=spec.file, variant=spec.name)
    L, S = spec.model.num_layers, spec.workload.seq_length
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < L]
        if bad:
            raise UserError(f"layer ids {bad} are outside the model's layers 0..{L - 1}.",
                            key="tricks.random_ltd.layers", fix=f"use ids between 0 and {L - 1}.", **where)
        if len(set(cfg.layers)) != len(cfg.layers):
            raise UserError("layer ids repeat.", key="tricks.random_ltd.layers", fix="list each layer once.", **where)
    if not 1 <= cfg.min_kept <= S:
        raise UserError(f"min_kept {cfg.min_kept} must be between 1 and seq_length {S}.",
                        key="tricks.random_ltd.min_kept", fix=f"set min_kept <= {S}.", **where)
    if cfg.step_size < 1 or cfg.step_size > S:
        raise UserError(f"step_size {cfg.step_size} must be between 1 and seq_length {S}.",
                        key="tricks.random_ltd.step_size", fix="use e.g. 16.", **where)
    if cfg.min_kept < cfg.step_size:
        raise UserError(f"min_kept {cfg.min_kept} is below step_size {cfg.step_size}, so the first "
                        "kept lengths would round to 0.", key="tricks.random_ltd.min_kept",
                        fix=f"set min_kept >= {cfg.step_size} or lower step_size.", **where)
    if cfg.schedule_steps < 1:
        raise UserError("schedule_steps must be at least 1.", key="tricks.random_ltd.schedule_steps",
                        fix="set the number of steps over which the kept length grows.", **where)
    if spec.parallel.sequence_parallel:
        raise UserError("random-LTD drops tokens along the sequence, which sequence parallelism shards.",
                        key="parallel.sequence_parallel", fix="set sequence_parallel = false.", **where)
    if spec.parallel.recompute != "none":
        raise UserError("random-LTD draws its token subset in the forward pass; recomputation would "
                        "redraw it for another micro-batch.", key="parallel.recompute",
                        fix='set recompute = "none".', **where)


def _runtime(spec, cfg):
    from suite.tricks.random_ltd.layer import RandomLTDRuntime

    return RandomLTDRuntime(spec, cfg)


def plan_row(spec, cfg: RandomLTDConfig) -> dict:
    """`suite plan`: the mean of the run's step FLOPs (the kept length grows with the step)."""
    w, shape = spec.workload, F.Shape.of(spec.model)
    # the kept length changes over the first schedule_steps steps only; every later step repeats the last
    growing = 1 if cfg.schedule == "constant" else min(w.steps, cfg.schedule_steps)
    total = sum(step_flops(cfg, shape, step, w.global_batch, w.seq_length) for step in range(growing))
    total += (w.steps - growing) * step_flops(cfg, shape, w.steps - 1, w.global_batch, w.seq_length)
    return {"flops_per_step": total // w.steps}


register(Trick(name="random_ltd", config=RandomLTDConfig, validate=validate, runtime=_runtime, plan_row=plan_row))
