"""The SPMD program ``torchrun ... -m suite run FILE`` runs on every rank.

Each rank reads the same resolved variants (``suite.launch.handoff``: the launcher's file, or the
scenario resolved on each rank under bare torchrun), joins the default process group (nccl with GPUs, gloo without),
and for each variant that fits the launched world size and this machine's memory: sets up
megatron-core ``parallel_state``, runs the workload, and rank 0 appends one record.
Ranks, local ranks and devices come only from the torchrun environment, so the same command runs on
one host or under ``--nnodes N`` rendezvous.

Every variant leaves one record, whatever happens (statuses in ``suite.records``):

* a variant that cannot run here is ``skipped`` with the reason: a layout that does not fit the
  launched world size, or a plan whose memory per process exceeds what this machine has
  (``suite.plan.check_memory``: refused before anything is built, exit 2);
* an exception inside a variant is caught on every rank; the ranks agree on the outcome with one
  all-gather, rank 0 records the first failing rank's error (``failed``) and the run goes on;
* a loss that goes non-finite ends the variant (``diverged``, with the step) and the run goes on;
* a hung rank, a killed rank, SIGINT and SIGTERM are handled by each rank's guard
  (``suite.launch.guard``): the record names the rank and the signal, and the program exits
  (1, or 128 + the signal: 130 for Ctrl-C); ``--resume`` then runs what is left, and
  ``python -m suite run`` (the launcher) starts the next variant in a fresh torchrun itself.

Exit status: 0 when every variant run was ok (layouts skipped for this world size included), 1 when
any failed, diverged or broke the process group, 2 on a scenario error or a variant refused as too
large for this machine (and nothing failed), 128 + signal when interrupted.

Fault injection, for the tests of all this (``tests/test_faults.py``, ``tests/test_runner.py``): with
``SUITE_INJECT_FAULT="VARIANT:STEP[:RANK[:KIND]]"`` the workload's fault hook, called before each
step (training) or grid point (inference), acts on variant VARIANT before step STEP + 1 (STEP counts
from 0, the logs from 1), on rank RANK (empty or omitted: every rank). KIND: ``raise`` (default)
raises a RuntimeError, ``hang`` sleeps forever, ``kill`` sends SIGKILL to the rank itself, ``nan``
makes every module's output NaN from then on (the loss goes non-finite: a divergence). Nothing else
reads this variable.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import gc
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from suite.errors import UserError
from suite.launch import cpu_compat, guard, handoff
from suite.launch.launcher import CUBLAS_DETERMINISTIC
from suite.metrics.env import fingerprint
from suite.records import append_record, completed, config_hash
from suite.scenario.validate import check_world

FAULT_ENV = "SUITE_INJECT_FAULT"  # see the module docstring
FAULT_KINDS = ("raise", "hang", "kill", "nan")
RANK0_REPORTS_S = 10  # the longest a rank waits on a scenario error for rank 0 to print it and exit


@dataclass
class RankContext:
    rank: int
    world: int
    local_rank: int
    label: str = ""
    group_timeout_s: float | None = None  # the variant's process groups' timeout (its own, e.g. a parallel mode's)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[suite {self.label}] {message}", flush=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _cap_host_threads(limit: int = 8) -> None:
    """On GPU the host threads only launch kernels and prepare batches; torch's default pool (every
    core) spins and slowed host-bound steps (measured in reports/README.md, "Host threads").
    torchrun already sets OMP_NUM_THREADS=1 for several processes per node; an explicit setting wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, min(limit, (os.cpu_count() or 1) // local_world)))


@contextlib.contextmanager
def deterministic(on: bool):
    """A variant's ``[workload] deterministic``: deterministic algorithms (warning where an op has none),
    cuDNN without benchmark autotuning, for the variant's span; then torch's defaults again."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)  # effective before cuBLAS starts
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _init_distributed(timeout_s: float) -> RankContext:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        _cap_host_threads()
        backend = "nccl"
    else:
        cpu_compat.enable()
        backend = "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
    return RankContext(rank, world, local_rank)


def _layout_ok(v, world: int) -> str | None:
    """None if the variant can run on this launch, else the reason it is skipped."""
    try:
        check_world(v, world)
    except UserError as e:
        need = v.world_size(launched=world)
        if need != world:
            return f"needs {need} process{'es' * (need != 1)}; {world} {'was' if world == 1 else 'were'} launched."
        return e.message
    return None


def _base_record(v, world: int, command: str | None = None) -> dict:
    resolved = v.resolved()
    p = v.parallel
    return {"status": None, "scenario": v.scenario, "scenario_file": v.file, "variant": v.name,
            "is_baseline": v.is_baseline, "config_hash": config_hash(resolved), "config": resolved,
            "started_at": _now(), "command": command or " ".join(sys.argv), "world_size": world,
            "tp": p.tp, "pp": p.pp, "dp": world // (p.tp * p.pp) if world % (p.tp * p.pp) == 0 else None}


def skipped_record(v, world: int, reason: str, command: str | None = None) -> dict:
    """The record of a variant that did not run here, with the reason (error.message)."""
    return {**_base_record(v, world, command), "status": "skipped", "finished_at": _now(), "env": None,
            "error": {"type": "Skipped", "message": reason, "traceback": None, "rank": None}}


def run_all(args) -> int:
    world = int(os.environ["WORLD_SIZE"])
    is_rank0 = int(os.environ["RANK"]) == 0
    try:  # the launcher's resolved variants, else this rank resolves the file (bare torchrun)
        variants = handoff.variants_for(args)
    except UserError as e:
        if is_rank0:
            print(f"error: {e}", file=sys.stderr)
        else:  # rank 0 meets the same error and says it; exiting first would let torchrun stop it unsaid
            time.sleep(RANK0_REPORTS_S)
        return 2
    out = args.out or os.path.join("results", variants[0].scenario)
    done = completed(out) if args.resume else set()
    runnable = []
    for v in variants:
        reason = _layout_ok(v, world)
        if reason:
            if is_rank0:
                print(f"[suite] skipping variant '{v.name}': {reason.rstrip('.')} (`python -m suite run` "
                      "sizes each variant itself).", flush=True)
                append_record(out, skipped_record(v, world, reason))
        elif (v.scenario, v.name, config_hash(v.resolved())) in done:
            if is_rank0:
                print(f"[suite] --resume: variant '{v.name}' already recorded in {out}", flush=True)
        else:
            runnable.append(v)
    if not runnable:
        return 0
    ctx = _init_distributed(max(v.workload.timeout_s for v in runnable) + guard.TIMEOUT_MARGIN_S)
    peers = [None] * ctx.world
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    watch = guard.install(ctx.rank, ctx.world, peers)
    statuses = []
    for v in runnable:
        status = _run_variant(v, ctx, out, args, watch)
        statuses.append(status)
        if status == "broken":
            break
    if "broken" not in statuses:
        dist.destroy_process_group()
    if any(s in ("failed", "diverged", "broken") for s in statuses):
        return 1
    return 2 if "refused" in statuses else 0


def end_rank(code: int):
    """Ends this rank with ``code`` once its records are written and its process group is gone, without the
    interpreter's finalization: there, C++ threads torch started (torch.compile's compile workers among
    them) were destroyed while still joinable and aborted the rank ('terminate called without an active
    exception', SIGABRT), so torchrun failed a run whose every record was ok: in about one compiled
    2-process variant in three on CPU, and still now and then after stopping the compile workers first
    (once in a CI run of the two-variant test)."""
    compile_pool = sys.modules.get("torch._inductor.async_compile")
    if compile_pool is not None:  # its worker processes would outlive the rank
        compile_pool.shutdown_compile_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fault_hook(v, rank: int, started):
    """The workload's per-step hook: marks the end of the build, and injects SUITE_INJECT_FAULT."""
    spec = os.environ.get(FAULT_ENV)
    parts = spec.split(":") if spec else []
    if parts and (len(parts) < 2 or len(parts) > 4 or not parts[1].isdigit()
                  or (len(parts) > 2 and parts[2] not in ("", "*") and not parts[2].isdigit())
                  or (len(parts) > 3 and parts[3] not in FAULT_KINDS)):
        raise UserError(f"{FAULT_ENV}={spec!r} is not VARIANT:STEP[:RANK[:KIND]] with KIND one of "
                        f"{', '.join(FAULT_KINDS)}.", fix=f"unset {FAULT_ENV} (it exists for the tests).")

    def hook(step: int) -> None:
        started.set()
        if not parts or parts[0] != v.name or int(parts[1]) != step:
            return
        if len(parts) > 2 and parts[2] not in ("", "*") and int(parts[2]) != rank:
            return
        kind = parts[3] if len(parts) > 3 else "raise"
        print(f"[suite] rank {rank}: injecting '{kind}' before step {step + 1} ({FAULT_ENV}={spec})",
              file=sys.stderr, flush=True)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "nan":  # removed when the variant ends (hook.handles)
            hook.handles.append(torch.nn.modules.module.register_module_forward_hook(
                lambda m, i, o: o * float("nan") if torch.is_tensor(o) and o.is_floating_point() else None))
            return
        raise RuntimeError(f"injected fault at step {step} on rank {rank} ({FAULT_ENV}={spec})")

    hook.handles = []
    return hook


def _build_progress(ctx: RankContext, started: threading.Event, every_s: float = 10.0) -> None:
    """Rank 0, until the first step: elapsed time and memory so far, every ``every_s`` seconds."""
    t0 = time.monotonic()
    while not started.wait(every_s):
        if torch.cuda.is_available():
            used = f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated on GPU {ctx.local_rank}"
        else:
            used = f"{_rss_bytes() / 2**30:.1f} GiB resident"
        ctx.log(f"building: {time.monotonic() - t0:.0f} s, {used}")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _feasible(v, ctx: RankContext) -> str | None:
    """None when every rank has the memory the plan needs; else rank 0's one-line refusal."""
    from suite.plan import check_memory

    reason = check_memory(v, ctx.world, local_rank=ctx.local_rank,
                          local_world=int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world)))
    reasons = [None] * ctx.world
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)


def _run_variant(v, ctx: RankContext, out: str, args, watch: guard.Guard) -> str:
    """Runs one variant; returns its status, 'refused' (too large here) or 'broken' (the process
    group can no longer be trusted)."""
    from megatron.core import parallel_state as ps

    from suite.workloads import workload_for

    ctx.label = f"{v.scenario}/{v.name}"
    ctx.group_timeout_s = v.workload.timeout_s + guard.TIMEOUT_MARGIN_S  # as megatron's groups below
    base = _base_record(v, ctx.world)
    refusal = _feasible(v, ctx)
    if refusal:
        if ctx.rank == 0:
            print(f"error: variant '{v.name}' {refusal}", file=sys.stderr, flush=True)
            append_record(out, skipped_record(v, ctx.world, refusal))
        return "refused"
    ctx.log(f"start: tp={base['tp']} pp={base['pp']} dp={base['dp']} on {ctx.world} "
            f"{'GPUs' if torch.cuda.is_available() else 'CPU processes'}")
    error, result = None, None
    # one name for this attempt on every rank, for the notes ranks leave behind
    attempt = [f"{v.name}.{uuid.uuid4().hex[:12]}" if ctx.rank == 0 else None]
    dist.broadcast_object_list(attempt, src=0)
    attempt = attempt[0]

    def finish(status: str, error: dict | None, metrics: dict | None = None) -> None:
        """Rank 0 appends the attempt's record (called once, by the main thread or the guard)."""
        if ctx.rank != 0:
            return
        record = {**base, "status": status, "finished_at": _now(), "env": fingerprint(ctx.world)}
        if error:
            record["error"] = {"type": error.get("type"), "message": error.get("message"),
                               "traceback": error.get("traceback"), "rank": error.get("rank"),
                               **{k: error[k] for k in ("signal", "step") if k in error}}
        if metrics is not None:
            record["metrics"] = metrics
        path = append_record(out, record)
        ctx.log(f"{status}: record appended to {path}")

    watch.begin(guard.Attempt(out, attempt, base, v.workload.timeout_s, finish))
    started = threading.Event()
    if ctx.rank == 0:
        threading.Thread(target=_build_progress, args=(ctx, started), daemon=True).start()
    hook = None
    try:
        hook = _fault_hook(v, ctx.rank, started)
        # every group megatron creates gets the variant's timeout (its default is 30 minutes)
        ps.initialize_model_parallel(tensor_model_parallel_size=v.parallel.tp,
                                     pipeline_model_parallel_size=v.parallel.pp,
                                     virtual_pipeline_model_parallel_size=v.parallel.vpp
                                     if v.parallel.vpp and v.parallel.vpp > 1 else None,
                                     distributed_timeout_minutes=(v.workload.timeout_s
                                                                  + guard.TIMEOUT_MARGIN_S) / 60)
        if torch.cuda.is_available():
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(v.workload.seed)
        torch.manual_seed(v.workload.seed)
        workload = workload_for(v)
        with deterministic(v.workload.deterministic):
            result = workload.run(v, ctx, fault=hook)
    except Exception as e:  # recorded, then the next variant runs
        error = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()[-4000:],
                 "rank": ctx.rank}
        print(f"[suite {ctx.label}] rank {ctx.rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        guard.leave_error(out, attempt, ctx.rank, error)
    finally:
        started.set()
        for handle in getattr(hook, "handles", []):
            handle.remove()
    # Agree on the outcome; if this collective fails the group is broken.
    metrics, status = None, "ok"
    try:
        errors = [None] * ctx.world
        dist.all_gather_object(errors, error)
        first_error = next((e for e in errors if e), None)
        intact = True
    except Exception as e:
        # a rank failed alone and the others timed out waiting, or a rank died: name the first cause
        first_error = watch.culprit(error or {
            "type": type(e).__name__, "message": f"process group broken: {e}",
            "traceback": traceback.format_exc()[-4000:], "rank": ctx.rank}, wait_s=3.0)
        intact = False
    diverged = result.get("diverged") if isinstance(result, dict) and not first_error else None
    if intact and not first_error:
        try:
            metrics = workload.metrics(result, v, ctx)
            if isinstance(result, dict) and "warmup_walltime_s" in result and isinstance(metrics, dict):
                metrics.setdefault("warmup_walltime_s", result["warmup_walltime_s"])
        except Exception as e:
            if not diverged:  # a diverged run's metrics may not exist (no timed step): record the divergence
                first_error = {"type": type(e).__name__, "message": f"computing metrics: {e}",
                               "traceback": traceback.format_exc()[-4000:], "rank": ctx.rank}
    if first_error:
        status = "failed" if first_error.get("type") != "Interrupted" else "interrupted"
    elif diverged:
        status = "diverged"
        first_error = {"type": "Diverged", "message": f"the training loss became {diverged['loss']} at step "
                       f"{diverged['step']}", "traceback": None, "rank": None, "step": diverged["step"]}
    try:
        ps.destroy_model_parallel()
    except Exception:
        pass
    result = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    watch.record_once(status, first_error, metrics=metrics)
    watch.end()
    return status if intact else "broken"
