"""The V-cycle workload: ``run`` trains each phase with the standard Trainer, ``metrics`` is train's.

Each phase is a real megatron-core model built by ``Trainer`` from a per-phase VariantSpec (its
level's shape, steps and LR). Between phases the previous model's parameters are gathered, coalesced
(going down; the large model's parameters are kept as the interpolation partner) or de-coalesced and
interpolated (going up), and loaded into the new model. The optimizer state and the LR schedule start
afresh in every phase. Steps are numbered continuously across phases and each phase draws its own
training batches (the data step is the global step).

Accounting, in the raw-result keys of ``suite.workloads.train.run``:

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
from suite.metrics.collect import training_metrics as metrics  # noqa: F401  (the workload interface)
from suite.metrics.energy import EnergyMeter
from suite.metrics.stats import summarize
from suite.models import checkpoint
from suite.tricks.multilevel import factors, level_models, phase_levels, phase_spec
from suite.tricks.multilevel import operators as ops
from suite.tricks.multilevel.state import full_state, load_state
from suite.workloads.train import StepClock, Trainer


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
    cuda = torch.cuda.is_available()
    clock = StepClock(cuda)
    energy = EnergyMeter(ctx.local_rank if cuda else None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, step_flops, timed, curve, phases, points = [], [], [], [], [], []
    saved, trainer, target, steps_run, transitions = {}, None, None, 0, 0.0

    def walltime() -> float:
        return sum(clock.seconds()) + transitions

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
        transitions += transition
        ctx.log(f"phase {p + 1}/{len(levels)}: level {level} ({models[level].num_layers} layers x "
                f"{models[level].hidden_size}), {pspec.workload.steps} steps, lr {pspec.workload.lr:g}"
                + (f", level change {transition:.2f} s" if p else ""))
        at_start = trainer.validation_loss() if p and spec.eval.validation else None
        first = steps_run
        n = pspec.workload.steps
        for local in range(n):
            if steps_run == w.warmup_steps:
                energy.start()
            fault(steps_run)
            clock.start()
            losses.append(trainer.train_step(steps_run))
            clock.stop()
            steps_run += 1
            step_flops.append(trainer.step_flops(local))
            timed.append(local >= w.warmup_steps)
            points.append({"phase": p, "shape": f"{models[level].num_layers}x{models[level].hidden_size}"})
            if (local + 1) % w.log_interval == 0 or local + 1 == n:
                recent = clock.seconds()[-1]
                ctx.log(f"step {steps_run} (phase {p + 1}, {local + 1}/{n}) loss {float(losses[-1]):.4f} "
                        f"lr {trainer.current_lr():.2e} step {recent * 1000:.1f} ms")
            due = w.eval_interval and steps_run % w.eval_interval == 0
            if due or (local + 1 == n and spec.eval.validation):
                loss = trainer.validation_loss()
                curve.append([steps_run, loss, walltime(), sum(step_flops), p])
                ctx.log(f"step {steps_run} (phase {p + 1}): validation loss {loss:.4f}")
                if final and w.target_loss is not None and loss <= w.target_loss:
                    target = _target_block(w, True, steps_run, curve[-1])
                    ctx.log(f"target loss {w.target_loss} reached at step {steps_run}")
                    break
        phases.append({"phase": p, "level": level, **_shape(models[level]),
                       "parameters": F.parameters(F.Shape.of(models[level]))["total"], "lr": pspec.workload.lr,
                       "first_step": first + 1, "last_step": steps_run, "steps": steps_run - first,
                       "tokens": (steps_run - first) * w.global_batch * w.seq_length,
                       "flops_per_step": step_flops[-1], "flops": sum(step_flops[first:]),
                       "transition_s": transition, "validation_at_start": at_start})
        if target:
            break
    times = clock.seconds()
    joules = energy.stop_joules()
    for ph in phases:
        ph["walltime_s"] = sum(times[ph["first_step"] - 1:ph["last_step"]]) + ph["transition_s"]
        ph["validation_at_end"] = next((c[1] for c in curve if c[0] == ph["last_step"]), None)
    # with eval.validation every phase ends with a validation, the last one included
    validation = curve[-1][1] if spec.eval.validation else None
    if w.target_loss is not None and target is None:
        end = [steps_run, validation, sum(times) + transitions, sum(step_flops)]
        target = _target_block(w, validation is not None and validation <= w.target_loss, steps_run, end)
    heldout = trainer.heldout()  # the full-size model the V-cycle ends with
    if w.save_checkpoint:  # that model, loadable at any layout as for plain training
        checkpoint.save(spec, trainer.model, ctx.log)
    timed_times = [t for t, keep in zip(times, timed) if keep]
    extra = {"levels": cfg.levels, "alpha": cfg.alpha, "transition_s": transitions,
             "width_factors": [wf for wf, _ in factors(cfg)], "depth_factors": [df for _, df in factors(cfg)],
             "phases": phases, "validation_curve": curve,
             "loss_curve": [[i + 1, float(x), _phase_of(i + 1, phases)] for i, x in enumerate(losses)]}
    return {
        "times": timed_times, "loss_values": [float(x) for x in losses], "validation": validation,
        "validation_curve": [c[:4] for c in curve if c[4] == len(levels) - 1],
        "energy_j": joules, "flops_total": sum(step_flops), "flops_per_step": step_flops[-1], "steps": steps_run,
        "timed_step_flops": [f for f, keep in zip(step_flops, timed) if keep],
        "step_points": [pt for pt, keep in zip(points, timed) if keep],  # one step-time measure per phase
        "validation_samples": getattr(trainer, "validation_batches", None) if spec.eval.validation else None,
        "tokens": w.global_batch * w.seq_length * steps_run,
        "parameters": F.parameters(F.Shape.of(spec.model))["total"],
        "summary": summarize(timed_times), "walltime_s": sum(times) + transitions, "target": target,
        "heldout": heldout, "extra": {"multilevel": extra},
    }


def _phase_of(step: int, phases: list[dict]) -> int:
    return next(ph["phase"] for ph in phases if ph["first_step"] <= step <= ph["last_step"])


def _target_block(w, reached: bool, steps: int, point: list) -> dict:
    """Like train's: steps, tokens, FLOPs and walltime (level changes included) to the target."""
    return {"target_loss": w.target_loss, "reached": reached, "steps": steps,
            "tokens": steps * w.global_batch * w.seq_length, "flops": point[3], "walltime_s": point[2]}
