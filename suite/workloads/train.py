"""Training workload: megatron-core's schedules (1F1B when pp > 1) over deterministic batches.

One optimizer step = ``global_batch / (micro_batch · dp)`` micro-batches through
``get_forward_backward_func``, DP gradient reduction by megatron's DistributedDataParallel, then the
megatron optimizer (fp32 master weights under bf16) and ``OptimizerParamScheduler``.

Timing: CUDA events around each step on GPU (host clock on CPU), warm-up steps excluded. Losses are
reduced on the device every step and read back only at log points, so logging does not stall the GPU.
A step never waits for the GPU (tests/gpu/test_train_step.py): the host launches the next step while the
GPU still runs this one, and the step clock measures the GPU's work, not the host's launch latency.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from suite import registry
from suite.data.tokens import TokenSource
from suite.metrics import flops as F
from suite.metrics import hardware
from suite.metrics.collect import peak_memory, reduce_scalar
from suite.metrics.energy import EnergyMeter
from suite.metrics.stats import summarize
from suite.models import checkpoint, gpt, kernels
from suite.models.build import build
from suite.workloads import optimizer_kernels
from suite.workloads.measures import training_measures


@dataclass
class StepClock:
    """Per-step durations: CUDA events on GPU (read at the end), host clock on CPU."""

    cuda: bool
    _events: list = field(default_factory=list)
    _host: list = field(default_factory=list)
    _t0: float = 0.0

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events.append([ev, None])
        else:
            self._t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events[-1][1] = ev
        else:
            self._host.append(time.perf_counter() - self._t0)

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in self._events]
        return list(self._host)


def _forward_step(data_iterator, model, tricks):
    sample_offset, batch = next(data_iterator)  # already on the model's device (Trainer._micro_batches)
    for t in tricks:
        t.begin_microbatch(sample_offset)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, positions, None, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        # clone: megatron scales the returned loss in place by 1/num_microbatches
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


class StepProfiler:
    """With SUITE_PROFILE=DIR, profiles 3 steps after warm-up (torch.profiler, host and device) and
    writes the top operators and kernels by device time (60, names up to 100 characters: compiled
    kernels are told apart by their fused op names) and by host time (30) to
    DIR/profile_<variant>_rank<r>.txt."""

    def __init__(self, spec, ctx, steps: int = 3):
        import os

        self.dir = os.environ.get("SUITE_PROFILE")
        self.first = min(spec.workload.warmup_steps, spec.workload.steps - 1)
        self.last = min(self.first + steps, spec.workload.steps) - 1
        self.name = f"profile_{spec.name}_rank{ctx.rank}.txt"
        self.prof = None

    def before(self, step: int) -> None:
        if self.dir and step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()

    def after(self, step: int) -> None:
        if self.prof is not None and step == self.last:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            from pathlib import Path

            table = self.prof.key_averages()
            device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            text = (f"steps {self.first}..{self.last}\n\n# by device time\n"
                    + table.table(sort_by=device_key, row_limit=60, max_name_column_width=100)
                    + "\n\n# by host time\n" + table.table(sort_by="self_cpu_time_total", row_limit=30))
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            (Path(self.dir) / self.name).write_text(text)
            self.prof = None


class Trainer:
    """Builds the model, optimizer and schedule for one variant on this rank."""

    def __init__(self, spec, ctx):
        self.spec, self.ctx = spec, ctx
        w = spec.workload
        self.cuda = torch.cuda.is_available()
        self.dp = ps.get_data_parallel_world_size()
        self.tricks = [registry.trick(name).runtime(spec, cfg) for name, cfg in spec.tricks.items()
                       if registry.trick(name).runtime]
        layer = gpt.layer_spec()
        for t in self.tricks:
            layer = t.layer_spec(layer)
        built = build(spec, layer, log=ctx.log)
        for t in self.tricks:
            t.attach(built.chunks)
        self.config = built.config
        self.model = gpt.wrap_for_training(built.chunks, self.config, overlap=self.cuda and self.dp > 1)
        # Hooks megatron's schedules call: DP grad sync and the final gradient all-reduces.
        self.config.finalize_model_grads_func = finalize_model_grads
        if self.cuda and self.dp > 1:
            no_sync = [m.no_sync for m in self.model]
            self.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            grad_sync = [m.start_grad_sync for m in self.model]
            self.config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
        bf16 = w.bf16
        opt_config = OptimizerConfig(
            optimizer=w.optimizer, lr=w.lr, min_lr=w.min_lr, weight_decay=w.weight_decay,
            adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=w.clip_grad, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=False)
        optimizer_kernels.install()  # gradient norm and clipping without a host read per parameter
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        kernels.fuse_optimizer(spec, self.optimizer)  # [model] kernels: torch's fused AdamW step
        optimizer_kernels.clip_in_step(kernels.torch_optimizers(self.optimizer))  # a fused step scales too
        # The LR schedule runs in steps, or in the units a technique consumes per step (layer-tokens).
        units = next((u for u in (t.lr_units() for t in self.tricks) if u), None)
        self.units_per_step, self.lr_increment = units or (1, lambda step: 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=w.lr, min_lr=w.min_lr,
            lr_warmup_steps=w.lr_warmup_steps * self.units_per_step,
            lr_decay_steps=max(w.steps, w.lr_warmup_steps + 1) * self.units_per_step,
            lr_decay_style=w.lr_schedule, start_wd=w.weight_decay, end_wd=w.weight_decay,
            wd_incr_steps=w.steps, wd_incr_style="constant")
        self.data = TokenSource(spec)
        self.fb = get_forward_backward_func()
        self.shape = F.Shape.of(spec.model)

    def _micro_batches(self, batch: torch.Tensor):
        """(index of the first sample in the global batch, micro-batch) for this DP rank."""
        mb, rank = self.spec.workload.micro_batch, ps.get_data_parallel_rank()
        per_rank = len(batch) // self.dp
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        if self.cuda:
            # One copy a step, from page-locked memory: CUDA may stage a copy from pageable memory in stream
            # order, so the host could wait for the GPU to drain before every micro-batch (not isolated here;
            # tests/gpu/test_train_step.py checks that the whole step never waits).
            mine = mine.pin_memory().cuda(non_blocking=True)
        micro = [(rank * per_rank + i * mb, mine[i * mb:(i + 1) * mb]) for i in range(per_rank // mb)]
        if len(self.model) == 1:
            return iter(micro)
        return [iter(micro) for _ in self.model]  # interleaved schedule: one iterator per chunk

    def _run(self, batch: torch.Tensor, forward_only: bool) -> torch.Tensor:
        """Mean loss over the batch as a device tensor, identical on every rank."""
        w = self.spec.workload
        losses = self.fb(forward_step_func=partial(_forward_step, tricks=self.tricks),
                         data_iterator=self._micro_batches(batch), model=self.model,
                         num_microbatches=len(batch) // self.dp // w.micro_batch,
                         seq_length=w.seq_length, micro_batch_size=w.micro_batch,
                         forward_only=forward_only)
        device = "cuda" if self.cuda else "cpu"
        total = torch.zeros(2, device=device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
            total[0] = torch.stack([d["loss"] for d in losses]).sum()
            total[1].fill_(len(losses))  # not `total[1] = n`: that copies n from pageable memory and waits
        dist.all_reduce(total)  # sum over DP ranks of the last stage (TP ranks hold equal copies)
        return total[0] / total[1]

    def train_step(self, step: int) -> torch.Tensor:
        w = self.spec.workload
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        for m in self.model:
            m.train()
        for t in self.tricks:
            t.begin_step(step)
        loss = self._run(self.data.train_batch(step, w.global_batch), forward_only=False)
        self.optimizer.step()
        self.scheduler.step(self.lr_increment(step))
        return loss

    @torch.no_grad()
    def validation_loss(self) -> float:
        w = self.spec.workload
        for m in self.model:
            m.eval()
        # whole global batches, so every layout sees the same held-out windows
        losses = torch.stack([self._run(self.data.valid_batch(i, w.global_batch), forward_only=True)
                              for i in range(w.eval_batches)])
        self.validation_batches = losses.tolist()  # per batch: the samples of the validation_loss measure
        return float(losses.mean())

    def heldout(self) -> dict | None:
        """Held-out text metrics of the model as it is now (``suite.eval.metrics.heldout_text``), or None
        when ``[eval] heldout_text`` is off or the data is not a text corpus. Every rank takes part."""
        from suite.eval.megatron_lm import MegatronLM
        from suite.eval.metrics import heldout_text, measures_heldout

        if not measures_heldout(self.spec):
            return None
        started = time.perf_counter()
        lm = MegatronLM(self.model, self.config, self.spec.model.vocab_size)
        m = heldout_text(self.spec, lm, self.data.valid, batch_size=self.spec.workload.micro_batch)
        bpb = "n/a" if m["bpb"] is None else f"{m['bpb']:.4f}"
        self.ctx.log(f"held-out text: loss {m['loss']:.4f} perplexity {m['perplexity']:.2f} bits/byte {bpb} "
                     f"over {m['tokens']:,} tokens ({time.perf_counter() - started:.1f} s)")
        return m

    def step_point(self, step: int) -> dict:
        """The techniques' schedule position of step ``step`` ({} for a fixed-shape step)."""
        return {k: v for t in self.tricks for k, v in t.step_point(step).items()}

    def step_flops(self, step: int) -> int:
        w = self.spec.workload
        for t in self.tricks:
            f = t.step_flops(step)
            if f is not None:
                return f
        return F.train_step_flops(self.shape, w.global_batch, w.seq_length)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class Progress:
    """What a training run accumulates over its phases (one model each): plain training has one phase,
    a technique's schedule (e.g. the multi-level V-cycle) several. Steps are numbered continuously;
    ``walltime`` sums every step time (warm-up included) plus ``transitions`` (time between phases that
    the technique counts, e.g. building the next model), never the validation passes."""

    def __init__(self, spec, ctx):
        self.spec, self.ctx, self.w = spec, ctx, spec.workload
        self.cuda = torch.cuda.is_available()
        self.clock = StepClock(self.cuda)
        self.energy = EnergyMeter(ctx.local_rank if self.cuda else None)
        self.profiler = StepProfiler(spec, ctx)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.losses, self.step_flops, self.timed, self.points, self.curve = [], [], [], [], []
        self.steps, self.transitions, self.target, self.diverged = 0, 0.0, None, None

    def walltime(self) -> float:
        return sum(self.clock.seconds()) + self.transitions

    def finish(self) -> None:
        """Reads the step times and the energy; a diverged run keeps the steps before the first
        non-finite loss (and the validation points up to there)."""
        self.times = self.clock.seconds()
        self.energy_j = self.energy.stop_joules()
        if self.diverged:
            self.steps = self.diverged["step"] - 1
            for values in (self.losses, self.times, self.step_flops, self.timed, self.points):
                del values[self.steps:]
            self.curve = [p for p in self.curve if p[0] <= self.steps]

    def target_block(self, reached: bool, steps: int, flops: int, walltime: float) -> dict:
        """The record's time-to-quality block: steps, tokens, FLOPs and walltime to the target."""
        w = self.w
        return {"target_loss": w.target_loss, "reached": reached, "steps": steps,
                "tokens": steps * w.global_batch * w.seq_length, "flops": flops, "walltime_s": walltime}


GC_EVERY = 50  # steps between collections of Python's young generations during training


@contextlib.contextmanager
def collections_between_steps():
    """Python's cyclic garbage collector, when automatic, runs inside whichever step crosses its allocation
    threshold and pauses the host for milliseconds; megatron waits for the gradient norm every step, so
    the GPU idles for that pause and the step's time grows by it. As Megatron-LM (--manual-gc) and
    torchtitan (gc_freq) do, training runs with the collector off, what exists at the start (model,
    optimizer, data) is frozen out of its scans, and ``collect`` runs between steps, outside the clock.
    Restored on exit, also on an error."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield lambda step: gc.collect(1) if (step + 1) % GC_EVERY == 0 else None
    finally:
        gc.enable()
        gc.unfreeze()


def train_phase(trainer: Trainer, run: Progress, fault=lambda step: None, *, label=None, point=None,
                phase: int | None = None, eval_last: bool = False, end_validation: bool = False,
                target: bool = True) -> None:
    """Train ``trainer``'s model for its spec's ``workload.steps`` steps, appending to ``run``.

    The training phase every training workload runs: per step the fault hook, profiler, timing, the
    step's FLOPs (``Trainer.step_flops`` of the phase's own step) and schedule point; loss read-back,
    divergence check and progress line at log points; validation every ``eval_interval`` global steps
    (on the phase's last step too with ``eval_last``, always there with ``end_validation``), each a
    ``run.curve`` point [step, loss, walltime, FLOPs(, phase)]; with ``target`` the run stops at the first
    validation at or below ``workload.target_loss`` (``run.target``). Energy is metered from the run's
    ``warmup_steps``-th step. ``label(local)`` names a step in the progress lines, ``point(local)`` its
    schedule position (default ``Trainer.step_point``); a phase's first ``warmup_steps`` are untimed.
    """
    with collections_between_steps() as collect:
        _train_steps(trainer, run, fault, collect, label=label, point=point, phase=phase, eval_last=eval_last,
                     end_validation=end_validation, target=target)


def _train_steps(trainer, run, fault, collect, *, label, point, phase, eval_last, end_validation, target):
    w, ctx, n = run.w, run.ctx, trainer.spec.workload.steps
    label = label or (lambda local: f"step {local + 1}/{n}")
    point = point or trainer.step_point
    checked = len(run.losses)
    for local in range(n):
        step = run.steps
        if step == w.warmup_steps:
            run.energy.start()
        fault(step)
        run.profiler.before(step)
        run.clock.start()
        run.losses.append(trainer.train_step(step))
        run.clock.stop()
        collect(step)
        run.profiler.after(step)
        run.steps = step + 1
        run.step_flops.append(trainer.step_flops(local))
        run.timed.append(local >= w.warmup_steps)
        run.points.append(point(local))
        last = local + 1 == n
        log_now = (local + 1) % w.log_interval == 0 or last
        due = bool(w.eval_interval) and run.steps % w.eval_interval == 0 and (eval_last or not last)
        eval_now = due or (last and end_validation)
        if log_now or eval_now:  # losses are read back only here, where the host waits anyway
            run.diverged = _divergence(run.losses, checked)
            checked = len(run.losses)
            if run.diverged:
                ctx.log(f"diverged: loss {run.diverged['loss']} at step {run.diverged['step']}; "
                        "stopping this variant")
                return
        if log_now:
            recent = run.clock.seconds()[-1]
            ctx.log(f"{label(local)} loss {float(run.losses[-1]):.4f} lr {trainer.current_lr():.2e} "
                    f"step {recent * 1000:.1f} ms {w.global_batch * w.seq_length / recent:,.0f} tok/s")
        if eval_now:
            loss = trainer.validation_loss()
            run.curve.append([run.steps, loss, run.walltime(), sum(run.step_flops)]
                             + ([] if phase is None else [phase]))
            ctx.log(f"step {run.steps}{'' if phase is None else f' (phase {phase + 1})'}: validation loss {loss:.4f}")
            if target and w.target_loss is not None and loss <= w.target_loss:
                run.target = run.target_block(True, run.steps, sum(run.step_flops), run.walltime())
                ctx.log(f"target loss {w.target_loss} reached at step {run.steps}")
                return


def run(spec, ctx, fault=lambda step: None) -> dict:
    """Train one variant on this rank; returns raw measurements (spmd assembles the record).

    At the end, ``Trainer.heldout`` scores the final model on the held-out text (``[eval] heldout_text``);
    like validation, it is not part of the walltime.

    With ``workload.target_loss`` the variant stops at the first validation (every
    ``eval_interval`` steps) whose loss is at or below the target, MLPerf style: the record's
    ``target`` block holds the steps, tokens, FLOPs and training walltime it took (walltime sums
    the step times, warm-up included, and excludes the validation passes themselves).
    """
    w = spec.workload
    trainer = Trainer(spec, ctx)
    progress = Progress(spec, ctx)
    train_phase(trainer, progress, fault)
    progress.finish()
    diverged, steps, times = progress.diverged, progress.steps, progress.times
    validation = trainer.validation_loss() if spec.eval.validation and not diverged else None
    if validation is not None and (not progress.curve or progress.curve[-1][0] != steps):
        progress.curve.append([steps, validation, sum(times), sum(progress.step_flops)])
    target = progress.target
    if w.target_loss is not None and target is None:
        reached = validation is not None and validation <= w.target_loss
        target = progress.target_block(reached, steps, sum(progress.step_flops), sum(times))
    heldout = None if diverged else trainer.heldout()
    if w.save_checkpoint and not diverged:
        checkpoint.save(spec, trainer.model, ctx.log)
    extra = {name: t.extra() for name, t in zip(spec.tricks, trainer.tricks)}
    out = raw_result(spec, trainer, progress, validation=validation, curve=progress.curve,
                     flops_per_step=trainer.step_flops(steps - 1), target=target, heldout=heldout, extra=extra)
    out.update(diverged=diverged)
    return out


def raw_result(spec, trainer: Trainer, progress: Progress, *, validation, curve: list, flops_per_step: int,
               target, heldout, extra: dict) -> dict:
    """The raw result every training workload returns after ``Progress.finish`` (``metrics`` below turns
    it into the record's metrics): untimed (warm-up) steps are left out of
    ``times``, ``summary``, ``timed_step_flops`` and ``step_points``."""
    w, p = spec.workload, progress
    timed = [t for t, keep in zip(p.times, p.timed) if keep]
    return {
        "times": timed, "loss_values": [float(x) for x in p.losses], "validation": validation,
        "validation_curve": curve, "energy_j": p.energy_j, "flops_total": sum(p.step_flops),
        "flops_per_step": flops_per_step, "steps": p.steps,
        "timed_step_flops": [f for f, keep in zip(p.step_flops, p.timed) if keep],
        "tokens": w.global_batch * w.seq_length * p.steps,
        "parameters": F.parameters(F.Shape.of(spec.model))["total"],
        "step_points": [pt for pt, keep in zip(p.points, p.timed) if keep],
        "validation_samples": getattr(trainer, "validation_batches", None) if validation is not None else None,
        "summary": summarize(timed), "walltime_s": sum(p.times) + p.transitions, "target": target,
        "heldout": heldout, "extra": extra, "trick_measures": [m for t in trainer.tricks for m in t.measures()],
        # start-up (first-step compilation, allocator growth) paid inside walltime_s and the validation
        # curve: the run's first warmup_steps, the same for every workload and technique
        "warmup_walltime_s": sum(p.times[:w.warmup_steps]),
        "compile": kernels.compile_stats(spec),
    }


def _divergence(losses: list, start: int) -> dict | None:
    """{'step', 'loss'} of the first non-finite loss in ``losses[start:]`` (one read-back), else None."""
    values = torch.stack(losses[start:]).tolist() if losses[start:] else []
    for i, value in enumerate(values):
        if not math.isfinite(value):
            return {"step": start + i + 1, "loss": str(value)}
    return None


def metrics(r: dict, v, ctx) -> dict:
    """Per-variant metrics (schema in suite.records) from this rank's raw results."""
    cuda = torch.cuda.is_available()
    peak, kind = peak_memory()
    peak = reduce_scalar(peak, dist.ReduceOp.MAX, ctx)
    energy = reduce_scalar(r["energy_j"], dist.ReduceOp.SUM, ctx)
    # Rank 0's clock is the step clock: every step ends with collectives that include it.
    summary = r["summary"]
    median = summary["median"]
    w = v.workload
    # all work over all time of the timed steps: right also when a technique varies FLOPs per step
    tflops = sum(r["timed_step_flops"]) / sum(r["times"]) / ctx.world / 1e12
    device_name = torch.cuda.get_device_name() if cuda else None
    peak_tflops = hardware.datasheet_peak_tflops(device_name)
    ceilings = hardware.measured_ceilings() if cuda else {}
    gemm = ceilings.get("gemm_tflops")
    timed_s = sum(r["times"])
    losses = r["loss_values"]
    tail = losses[-min(5, len(losses)):]
    out = {
        "parameters": r["parameters"], "steps": r["steps"], "timed_steps": len(r["times"]),
        "tokens": r["tokens"], "step_time_s": summary, "walltime_s": r["walltime_s"],
        "tokens_per_s": w.global_batch * w.seq_length / median,
        "flops_per_step": r["flops_per_step"], "flops_total": r["flops_total"],
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "gemm_ceiling_tflops": gemm, "fraction_of_gemm_ceiling": tflops / gemm if gemm else None,
        "copy_bandwidth_tb_s": ceilings.get("copy_tb_s"),
        "peak_memory_bytes": int(peak), "memory_kind": kind,
        "loss_curve": [[i + 1, x] for i, x in enumerate(losses)],
        "final_loss": sum(tail) / len(tail),
        "validation_loss": r["validation"], "validation_curve": r["validation_curve"],
        "energy_j": energy, "avg_power_w": energy / timed_s if energy is not None and timed_s else None,
        "heldout": r.get("heldout"), "target": r["target"], "extra": r["extra"],
        "compile": r.get("compile"),
    }
    heldout = dict(r["heldout"]) if r.get("heldout") else None  # its per-window losses go to the measures
    out["heldout"] = heldout
    windows = heldout.pop("window_losses", None) if heldout else None
    out["measures"] = training_measures(out, r["times"], r.get("step_points"), r.get("validation_samples"), windows)
    out["measures"] += r.get("trick_measures") or []
    return out
