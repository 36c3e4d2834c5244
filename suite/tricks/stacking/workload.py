"""The stacking workload: the shallow phase, the growth, the grown phase — each trained by the training
phase plain training runs (``suite.workloads.train.train_phase``); ``metrics`` is train's.

The growth gathers the shallow model's parameters (fp32 master weights under bf16) across TP and PP,
stacks them (``operators.stack``) and loads them into a freshly built full-depth model and optimizer, with
the V-cycle's gather and scatter (``suite.tricks.multilevel.state``), so it works at any TP/PP layout.

Accounting, as for the V-cycle (``suite.tricks.multilevel.vcycle``): every step counts its own phase's
FLOPs; walltime is every step time plus the growth (gather, stack, build the grown model and optimizer,
load), validation excluded; each phase's first ``warmup_steps`` are untimed; the record's
``validation_curve`` holds the grown phase's points only (the model the run produces), and
``extra.stacking`` every point with its phase, plus per-phase steps, FLOPs, walltime and the validation
loss at the end of the shallow phase and right after the growth. ``target_loss`` is checked in the grown
phase only.
"""
from __future__ import annotations

import gc
import time

import torch

from suite.metrics import flops as F
from suite.workloads.train import metrics  # noqa: F401  (the workload interface)
from suite.models import checkpoint
from suite.tricks.multilevel.state import full_state, load_state
from suite.tricks.stacking import phase_models, phase_spec
from suite.tricks.stacking.operators import stack
from suite.workloads.train import Progress, Trainer, raw_result, train_phase


def _now(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def run(spec, ctx, fault=lambda step: None) -> dict:
    cfg, w = spec.tricks["stacking"], spec.workload
    models = phase_models(spec.model, cfg)
    progress = Progress(spec, ctx)
    phases, trainer = [], None
    for p, model in enumerate(models):
        pspec = phase_spec(spec, cfg, p)
        started = _now(progress.cuda)
        state = stack(full_state(trainer.model), cfg.growth) if p else None
        trainer = None  # free the shallow model and its optimizer before building the grown one
        gc.collect()
        trainer = Trainer(pspec, ctx)
        if p:
            load_state(trainer.model, state)
        state = None
        growth_s = _now(progress.cuda) - started if p else 0.0
        progress.transitions += growth_s
        ctx.log(f"phase {p + 1}/2: {model.num_layers} layers x {model.hidden_size}, {pspec.workload.steps} steps, "
                f"lr {pspec.workload.lr:g}" + (f", growth x{cfg.growth} {growth_s:.2f} s" if p else ""))
        at_start = trainer.validation_loss() if p and spec.eval.validation else None
        first, n, shape = progress.steps, pspec.workload.steps, f"{model.num_layers}x{model.hidden_size}"
        train_phase(trainer, progress, fault, phase=p, eval_last=True, end_validation=spec.eval.validation,
                    target=p == 1, label=lambda local: f"step {first + local + 1} (phase {p + 1}, {local + 1}/{n})",
                    point=lambda local: {"phase": p, "shape": shape})
        last = progress.steps
        phases.append({"phase": p, "layers": model.num_layers, "hidden": model.hidden_size,
                       "parameters": F.parameters(F.Shape.of(model))["total"], "lr": pspec.workload.lr,
                       "first_step": first + 1, "last_step": last, "steps": last - first,
                       "tokens": (last - first) * w.global_batch * w.seq_length,
                       "flops_per_step": progress.step_flops[-1], "flops": sum(progress.step_flops[first:]),
                       "transition_s": growth_s, "validation_at_start": at_start})
        if progress.target or progress.diverged:
            break
    progress.finish()
    times, curve, diverged = progress.times, progress.curve, progress.diverged
    phases = [ph for ph in phases if ph["first_step"] <= progress.steps]
    for ph in phases:
        ph["last_step"] = min(ph["last_step"], progress.steps)
        ph["walltime_s"] = sum(times[ph["first_step"] - 1:ph["last_step"]]) + ph["transition_s"]
        ph["validation_at_end"] = next((c[1] for c in curve if c[0] == ph["last_step"]), None)
    validation = curve[-1][1] if spec.eval.validation and curve and not diverged and len(phases) == 2 else None
    target = progress.target
    if w.target_loss is not None and target is None:
        target = progress.target_block(validation is not None and validation <= w.target_loss, progress.steps,
                                       sum(progress.step_flops), sum(times) + progress.transitions)
    heldout = None if diverged else trainer.heldout()
    if w.save_checkpoint and not diverged:
        checkpoint.save(spec, trainer.model, ctx.log)
    extra = {"growth": cfg.growth, "transition_s": progress.transitions, "phases": phases,
             "validation_curve": curve,
             "loss_curve": [[i + 1, float(x), next(ph["phase"] for ph in phases if ph["first_step"] <= i + 1
                                                     <= ph["last_step"])] for i, x in enumerate(progress.losses)]}
    out = raw_result(spec, trainer, progress, validation=validation, curve=[c[:4] for c in curve if c[4] == 1],
                     flops_per_step=progress.step_flops[-1] if progress.step_flops else 0, target=target,
                     heldout=heldout, extra={"stacking": extra})
    if diverged:
        out["diverged"] = diverged
    return out
