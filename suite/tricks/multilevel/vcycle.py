"""The V-cycle workload: ``run`` trains each phase with the standard Trainer through the training phase
plain training runs (``suite.workloads.train.train_phase``), ``metrics`` is train's.

Each phase is a real megatron-core model built by ``Trainer`` from a per-phase VariantSpec (its
level's shape, steps and LR). Between phases the previous model's parameters are gathered, coalesced
(going down; the large model's parameters are kept as the interpolation partner) or de-coalesced and
interpolated (going up), and loaded into the new model. The optimizer state and the LR schedule start
afresh in every phase. Steps are numbered continuously across phases and each phase draws its own
training batches (the data step is the global step).

Accounting, in the raw-result keys of ``suite.workloads.train.raw_result``:

* FLOPs: every step counts its own level's ``train_step_flops``;
* walltime: step times of all phases (warm-up included) plus the level changes (gather, operators,
  building the next model and optimizer), validation excluded; the first model's construction is
  not counted, as for the baseline;
* timed steps: each phase's first ``warmup_steps`` are excluded (each phase is a new model);
* validation: every ``eval_interval`` global steps and at the end of each phase. The record's
  ``validation_curve`` holds the final phase's points only (the model the V-cycle produces, so the
  report's equal-quality section is not met by a smaller level); ``extra.multilevel`` holds all of
  them with their phase. ``target_loss`` is checked in the final phase only and stops the run there.
"""
from __future__ import annotations

import gc
import time

import torch

from suite.metrics import flops as F
from suite.workloads.train import metrics  # noqa: F401  (the workload interface)
from suite.models import checkpoint
from suite.tricks.multilevel import factors, level_models, phase_levels, phase_spec
from suite.tricks.multilevel import operators as ops
from suite.tricks.multilevel.state import full_state, load_state
from suite.workloads.train import Progress, Trainer, raw_result, train_phase


def _host_seconds(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def _shape(model) -> dict:
    return {"layers": model.num_layers, "hidden": model.hidden_size, "heads": model.num_attention_heads,
            "groups": model.num_query_groups, "ffn": model.ffn_hidden_size}


def _next_parameters(trainer, level: int, previous: int, saved: dict, cfg) -> dict:
    """The parameters the model of ``level`` starts from, after training the one of ``previous``."""
    current = full_state(trainer.model)
    if level > previous:  # going down: keep the large model as the interpolation partner
        saved[previous] = current
        return ops.coalesce(current, *factors(cfg)[previous])
    return ops.interpolate(saved.pop(level), ops.decoalesce(current, *factors(cfg)[level]), cfg.alpha)


def run(spec, ctx, fault=lambda step: None) -> dict:
    cfg, w = spec.tricks["multilevel"], spec.workload
    levels, models = phase_levels(cfg.levels), level_models(spec.model, cfg)
    progress = Progress(spec, ctx)
    cuda, phases, saved, trainer = progress.cuda, [], {}, None
    for p, level in enumerate(levels):
        final = p == len(levels) - 1
        pspec = phase_spec(spec, cfg, p)
        started = _host_seconds(cuda)
        state = _next_parameters(trainer, level, levels[p - 1], saved, cfg) if p else None
        trainer = None  # free the previous model and optimizer before building the next
        gc.collect()
        trainer = Trainer(pspec, ctx)
        if p:
            load_state(trainer.model, state)
        state = None
        transition = _host_seconds(cuda) - started if p else 0.0
        progress.transitions += transition
        ctx.log(f"phase {p + 1}/{len(levels)}: level {level} ({models[level].num_layers} layers x "
                f"{models[level].hidden_size}), {pspec.workload.steps} steps, lr {pspec.workload.lr:g}"
                + (f", level change {transition:.2f} s" if p else ""))
        at_start = trainer.validation_loss() if p and spec.eval.validation else None
        first, n = progress.steps, pspec.workload.steps
        shape = f"{models[level].num_layers}x{models[level].hidden_size}"
        train_phase(trainer, progress, fault, phase=p, eval_last=True, end_validation=spec.eval.validation,
                    target=final, label=lambda local: f"step {first + local + 1} (phase {p + 1}, {local + 1}/{n})",
                    point=lambda local: {"phase": p, "shape": shape})
        steps_run, step_flops = progress.steps, progress.step_flops
        phases.append({"phase": p, "level": level, **_shape(models[level]),
                       "parameters": F.parameters(F.Shape.of(models[level]))["total"], "lr": pspec.workload.lr,
                       "first_step": first + 1, "last_step": steps_run, "steps": steps_run - first,
                       "tokens": (steps_run - first) * w.global_batch * w.seq_length,
                       "flops_per_step": step_flops[-1], "flops": sum(step_flops[first:]),
                       "transition_s": transition, "validation_at_start": at_start})
        if progress.target or progress.diverged:
            break
    progress.finish()
    times, curve, diverged = progress.times, progress.curve, progress.diverged
    phases = [ph for ph in phases if ph["first_step"] <= progress.steps]  # a diverged run keeps whole steps
    for ph in phases:
        ph["walltime_s"] = sum(times[ph["first_step"] - 1:ph["last_step"]]) + ph["transition_s"]
        ph["validation_at_end"] = next((c[1] for c in curve if c[0] == ph["last_step"]), None)
    # with eval.validation every phase ends with a validation, the last one included
    validation = curve[-1][1] if spec.eval.validation and curve and not diverged else None
    target = progress.target
    if w.target_loss is not None and target is None:
        target = progress.target_block(validation is not None and validation <= w.target_loss, progress.steps,
                                       sum(progress.step_flops), sum(times) + progress.transitions)
    heldout = None if diverged else trainer.heldout()  # the full-size model the V-cycle ends with
    if w.save_checkpoint and not diverged:  # that model, loadable at any layout as for plain training
        checkpoint.save(spec, trainer.model, ctx.log)
    extra = {"levels": cfg.levels, "alpha": cfg.alpha, "transition_s": progress.transitions,
             "width_factors": [wf for wf, _ in factors(cfg)], "depth_factors": [df for _, df in factors(cfg)],
             "phases": phases, "validation_curve": curve,
             "loss_curve": [[i + 1, float(x), _phase_of(i + 1, phases)] for i, x in enumerate(progress.losses)]}
    out = raw_result(spec, trainer, progress, validation=validation,
                     curve=[c[:4] for c in curve if c[4] == len(levels) - 1],
                     flops_per_step=progress.step_flops[-1] if progress.step_flops else 0, target=target,
                     heldout=heldout, extra={"multilevel": extra})
    if diverged:
        out["diverged"] = diverged
    return out


def _phase_of(step: int, phases: list[dict]) -> int:
    return next(ph["phase"] for ph in phases if ph["first_step"] <= step <= ph["last_step"])
