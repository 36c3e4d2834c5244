"""Multi-level training (Zou, Zhang, Deng, ICLR 2024, arXiv 2404.07999): a V-cycle over model sizes.

The scenario's model is level 0. Each *coalescing* divides the width (hidden size, attention heads,
query groups and SwiGLU units, head size kept) by a width factor and the layer count by a depth
factor, giving level 1 (and level 2 for three levels). The V-cycle trains each level in turn,
large → small → large, e.g. for two levels::

    level 0: steps[0] ─ coalesce ─ level 1: steps[1] ─ de-coalesce, interpolate ─ level 0: steps[2]

Going down, the parameters are coalesced (``operators.coalesce``); going up, the small model is
de-coalesced and interpolated with the large model's parameters saved just before it was
coalesced: θ ← (1 − α)·θ_large + α·D(θ_small). Each phase is a fresh megatron-core model, optimizer
(state reset, as the authors do) and LR schedule (warm-up then decay over the phase's steps).

This module is torch-free (config, level shapes, FLOPs, validation); ``operators.py`` holds the
parameter maps, ``state.py`` the TP/PP gather and scatter, ``vcycle.py`` the workload.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from suite import errors
from suite.metrics import flops as F
from suite.fields import doc
from suite.registry import Trick, register

SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")


@dataclass
class MultilevelConfig:
    """[tricks.multilevel]"""

    levels: int = doc("Model sizes in the V-cycle: 2 (large, small) or 3 (large, medium, small).", 2,
                      choices=(2, 3))
    steps: list[int] | None = doc("Optimizer steps of each phase in V order (2 levels: [large, small, large]; "
                                  "3 levels: [large, medium, small, medium, large]). Replaces workload.steps.",
                                  range="[1, 1000000000]")
    lr: list[float] | None = doc("Peak LR of each phase in V order (default: workload.lr for all); "
                                 "each phase's min_lr keeps workload.min_lr's ratio to lr.", range="(0, 100]")
    width_factors: list[int] | None = doc("Divisor of hidden size, heads, query groups and SwiGLU width at each "
                                          "coalescing (default: 2 each).", range="[1, 1024]")
    depth_factors: list[int] | None = doc("Divisor of the layer count at each coalescing; adjacent layers are "
                                          "averaged (default: 2 each).", range="[1, 1024]")
    alpha: float = doc("Interpolation weight of the de-coalesced small model on the way up: "
                       "theta = (1 - alpha) * theta_large + alpha * D(theta_small).", 0.25, range="[0, 1]")


def phase_levels(levels: int) -> list[int]:
    """The level trained in each phase: [0, 1, 0] or [0, 1, 2, 1, 0]."""
    return list(range(levels)) + list(range(levels - 2, -1, -1))


def phase_names(levels: int) -> str:
    names = ["large", "medium", "small"] if levels == 3 else ["large", "small"]
    return ", ".join(names[level] for level in phase_levels(levels))


def factors(cfg: MultilevelConfig) -> list[tuple[int, int]]:
    """(width factor, depth factor) of each coalescing, level i -> i + 1."""
    n = cfg.levels - 1
    return list(zip(cfg.width_factors or [2] * n, cfg.depth_factors or [2] * n))


def coalesced(model, width: int, depth: int):
    """The [model] section one coalescing gives (head size and vocabulary kept)."""
    return replace(model, num_layers=model.num_layers // depth, hidden_size=model.hidden_size // width,
                   num_attention_heads=model.num_attention_heads // width,
                   num_query_groups=model.num_query_groups // width,
                   ffn_hidden_size=model.ffn_hidden_size // width)


def level_models(model, cfg: MultilevelConfig) -> list:
    """The [model] section of every level (level 0 is the scenario's own)."""
    out = [model]
    for width, depth in factors(cfg):
        out.append(coalesced(out[-1], width, depth))
    return out


def phase_spec(spec, cfg: MultilevelConfig, phase: int):
    """The VariantSpec one phase trains: its level's shape, steps and LR, no techniques."""
    w = spec.workload
    lr = cfg.lr[phase] if cfg.lr else w.lr
    model = level_models(spec.model, cfg)[phase_levels(cfg.levels)[phase]]
    if phase:  # [model] init applies to the first phase; later ones start from the level change
        model = replace(model, init="random")
    workload = replace(w, steps=cfg.steps[phase], lr=lr, min_lr=w.min_lr * lr / w.lr)
    return replace(spec, model=model, workload=workload, tricks={})


def phase_flops(spec, cfg: MultilevelConfig, steps: list[int] | None = None) -> list[int]:
    """Model FLOPs of each phase: its steps times its own level's training step FLOPs."""
    w = spec.workload
    models = level_models(spec.model, cfg)
    steps = cfg.steps if steps is None else steps
    return [n * F.train_step_flops(F.Shape.of(models[level]), w.global_batch, w.seq_length)
            for n, level in zip(steps, phase_levels(cfg.levels))]


def check_phase_lists(spec, key: str, steps, lr, n: int, names: str, run: str) -> None:
    """A phased schedule's ``steps`` (required) and ``lr`` (optional): one entry for each of the ``n``
    phases (``names``) of ``run``, every phase longer than the warm-up (each phase is a new model)."""
    if steps is None:
        errors.fail(spec, key + "steps", f"steps is required: one step count per phase ({names}).",
                    f"write e.g. steps = {[100] * n}.")
    if len(steps) != n:
        errors.fail(spec, key + "steps", f"steps has {len(steps)} entries; {run} has {n} phases ({names}).",
                    f"give {n} step counts.")
    warmup = spec.workload.warmup_steps
    for i, count in enumerate(steps):
        if count <= warmup:
            errors.fail(spec, key + "steps", f"phase {i} has {count} steps, not more than workload.warmup_steps "
                        f"{warmup} (each phase is a new model whose first steps are warm-up).",
                        f"give every phase more than {warmup} steps or lower warmup_steps.")
    if lr is not None and len(lr) != n:
        errors.fail(spec, key + "lr", f"lr has {len(lr)} entries; {run} has {n} phases ({names}).",
                    f"give {n} learning rates or remove lr.")


def validate(spec, cfg: MultilevelConfig) -> None:
    key = "tricks.multilevel."  # prefix of this section's keys

    def fail(k, message, fix):
        errors.fail(spec, k, message, fix)

    n_phases, n_coal = 2 * cfg.levels - 1, cfg.levels - 1
    check_phase_lists(spec, key, cfg.steps, cfg.lr, n_phases, phase_names(cfg.levels), f"a {cfg.levels}-level V-cycle")
    for name in ("width_factors", "depth_factors"):
        value = getattr(cfg, name)
        if value is not None and len(value) != n_coal:
            fail(key + name, f"{name} has {len(value)} entries; {cfg.levels} levels have {n_coal} coalescing"
                 f"{'s' if n_coal > 1 else ''}.", f"give {n_coal} factor{'s' if n_coal > 1 else ''} or remove it.")
        if value is not None and any(f < 1 for f in value):
            fail(key + name, f"factors must be at least 1, got {value}.", "use 2 to halve, 1 to keep.")
    for i, (width, depth) in enumerate(factors(cfg)):
        if width == depth == 1:
            fail(key + "width_factors", f"coalescing {i + 1} changes neither width nor depth (both factors 1).",
                 "set a width or depth factor of 2.")
    if not 0 <= cfg.alpha <= 1:
        fail(key + "alpha", f"alpha must be between 0 and 1, got {cfg.alpha}.", "use e.g. alpha = 0.25.")
    m = spec.model
    for i, (width, depth) in enumerate(factors(cfg)):
        for k, divisor, kind in [("hidden_size", width, "width"), ("num_attention_heads", width, "width"),
                                 ("num_query_groups", width, "width"), ("ffn_hidden_size", width, "width"),
                                 ("num_layers", depth, "depth")]:
            value = getattr(m, k)
            if value % divisor:
                fail(key + f"{kind}_factors", f"coalescing level {i} into level {i + 1}: {k} {value} is not "
                     f"divisible by the {kind} factor {divisor}.",
                     f"choose a {kind} factor that divides {k} at every level.")
        m = coalesced(m, width, depth)
        _check_layout(spec, m, i + 1, fail)


def _check_layout(spec, m, level: int, fail) -> None:
    """The checks of suite.scenario.validate that depend on the shape, for a smaller level."""
    p = spec.parallel
    for k in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(m, k) % p.tp:
            fail("parallel.tp", f"level {level} of the V-cycle has {k} {getattr(m, k)}, not divisible by tp {p.tp}.",
                 "lower tp or the width factors.")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        what = f"pp {p.pp}" + (f" x vpp {p.vpp}" if p.vpp else "")
        fail("parallel.pp", f"level {level} of the V-cycle has {m.num_layers} layers, not divisible by {what}.",
             "lower pp (x vpp) or the depth factors.")


def plan_row(spec, cfg: MultilevelConfig) -> dict:
    """`suite plan`: the mean step FLOPs over every phase's steps."""
    return {"flops_per_step": sum(phase_flops(spec, cfg)) // sum(cfg.steps)}


register(Trick(name="multilevel", config=MultilevelConfig, validate=validate,
               workload="suite.tricks.multilevel.vcycle", plan_row=plan_row))
