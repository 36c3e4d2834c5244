"""The SPMD program ``torchrun ... -m suite run FILE`` runs on every rank.

Each rank reads the same scenario, joins the default process group (nccl with GPUs, gloo without),
and for each variant that fits the launched world size: sets up megatron-core ``parallel_state``,
runs the workload, and rank 0 appends one record. Ranks, local ranks and devices come only from the
torchrun environment, so the same command runs on one host or under ``--nnodes N`` rendezvous.

Failures: an exception inside a variant is caught on every rank; the ranks agree on the outcome with
one all-reduce, rank 0 appends a failure record naming the first failing rank's error, and the run
goes on with the next variant. If the process group itself is broken (a rank died or a collective
timed out after ``workload.timeout_s``), rank 0 records the failure and the program exits non-zero;
``python -m suite run`` (the launcher) then starts the next variant in a fresh torchrun.
"""
from __future__ import annotations

import datetime as dt
import gc
import glob
import json
import os
import sys
import traceback
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from suite.errors import UserError
from suite.launch import cpu_compat
from suite.metrics.env import fingerprint
from suite.records import append_record, completed, config_hash
from suite.scenario import load_scenario
from suite.scenario.validate import check_world

FAULT_ENV = "SUITE_INJECT_FAULT"  # "VARIANT:STEP[:RANK]" raises there (used by the failure tests)


@dataclass
class RankContext:
    rank: int
    world: int
    local_rank: int
    label: str = ""

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[suite {self.label}] {message}", flush=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _cap_host_threads(limit: int = 8) -> None:
    """On GPU the host threads only launch kernels and prepare batches; torch's default pool (every
    core) spins and slowed host-bound steps: a 6 x 384 model's training step took 53.4 ms with the
    default and 39.3 ms with 8 threads on an H200 host of 64 cores (the large model's 164.6 vs 153.8 ms).
    torchrun already sets OMP_NUM_THREADS=1 for several processes per node; an explicit setting wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, min(limit, (os.cpu_count() or 1) // local_world)))


def _init_distributed(timeout_s: int) -> RankContext:
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
        return str(e)
    return None


def run_all(args) -> int:
    ctx_world = int(os.environ["WORLD_SIZE"])
    is_rank0 = int(os.environ["RANK"]) == 0
    try:
        variants = load_scenario(args.scenario, args.overrides, args.variants)
    except UserError as e:
        if is_rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("results", variants[0].scenario)
    done = completed(out) if args.resume else set()
    runnable = []
    for v in variants:
        reason = _layout_ok(v, ctx_world)
        if reason:
            if is_rank0:
                print(f"[suite] skipping variant '{v.name}': {reason} "
                      f"(`python -m suite run {args.scenario}` launches each variant with its own size)",
                      flush=True)
        elif (v.scenario, v.name, config_hash(v.resolved())) in done:
            if is_rank0:
                print(f"[suite] --resume: variant '{v.name}' already recorded in {out}", flush=True)
        else:
            runnable.append(v)
    if not runnable:
        return 0
    ctx = _init_distributed(max(v.workload.timeout_s for v in runnable))
    broken = False
    try:
        for v in runnable:
            if not _run_variant(v, ctx, out, args):
                broken = True
                break
    finally:
        if not broken:
            dist.destroy_process_group()
    return 1 if broken else 0


def _maybe_inject_fault(v, step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == v.name and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank):
        raise RuntimeError(f"injected fault at step {step} on rank {rank} ({FAULT_ENV}={spec})")


def _leave_error(out: str, attempt: str, rank: int, error: dict) -> None:
    """A failing rank writes its error beside the records before any collective, so rank 0 can
    report the real cause even when the failure breaks the process group (ranks share the results
    folder on one host; on several hosts rank 0 falls back to its own error)."""
    os.makedirs(os.path.join(out, "errors"), exist_ok=True)
    with open(os.path.join(out, "errors", f"{attempt}.rank{rank}.json"), "w") as f:
        json.dump(error, f)


def _left_error(out: str, attempt: str) -> dict | None:
    paths = sorted(glob.glob(os.path.join(out, "errors", f"{attempt}.rank*.json")), key=os.path.getmtime)
    if not paths:
        return None
    with open(paths[0]) as f:  # the first failure in time is the cause; later ones are its echoes
        return json.load(f)


def _run_variant(v, ctx: RankContext, out: str, args) -> bool:
    """Runs one variant; False when the process group can no longer be trusted."""
    from megatron.core import parallel_state as ps

    from suite.workloads import workload_for

    ctx.label = f"{v.scenario}/{v.name}"
    resolved = v.resolved()
    base = {"status": None, "scenario": v.scenario, "scenario_file": v.file, "variant": v.name,
            "is_baseline": v.is_baseline, "config_hash": config_hash(resolved), "config": resolved,
            "started_at": _now(), "command": " ".join(sys.argv), "world_size": ctx.world,
            "tp": v.parallel.tp, "pp": v.parallel.pp, "dp": ctx.world // (v.parallel.tp * v.parallel.pp)}
    ctx.log(f"start: tp={base['tp']} pp={base['pp']} dp={base['dp']} on {ctx.world} "
            f"{'GPUs' if torch.cuda.is_available() else 'CPU processes'}")
    error, result = None, None
    # one name for this attempt on every rank, for the error files ranks leave behind
    attempt = [f"{v.name}.{uuid.uuid4().hex[:12]}" if ctx.rank == 0 else None]
    dist.broadcast_object_list(attempt, src=0)
    attempt = attempt[0]
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=v.parallel.tp,
                                     pipeline_model_parallel_size=v.parallel.pp,
                                     virtual_pipeline_model_parallel_size=v.parallel.vpp
                                     if v.parallel.vpp and v.parallel.vpp > 1 else None)
        if torch.cuda.is_available():
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(v.workload.seed)
        torch.manual_seed(v.workload.seed)
        workload = workload_for(v)
        result = workload.run(v, ctx, fault=lambda step: _maybe_inject_fault(v, step, ctx.rank))
    except Exception as e:  # recorded, then the next variant runs
        error = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()[-4000:],
                 "rank": ctx.rank}
        print(f"[suite {ctx.label}] rank {ctx.rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        _leave_error(out, attempt, ctx.rank, error)
    # Agree on the outcome; if this collective fails the group is broken.
    try:
        errors = [None] * ctx.world
        dist.all_gather_object(errors, error)
        first_error = next((e for e in errors if e), None)
        metrics = None if first_error else workload.metrics(result, v, ctx)
        intact = True
    except Exception as e:
        # a rank failed alone and the others timed out waiting: report the first failure's own error
        first_error = _left_error(out, attempt) or error or {
            "type": type(e).__name__, "message": f"process group broken: {e}",
            "traceback": traceback.format_exc()[-4000:], "rank": ctx.rank}
        metrics, intact = None, False
    finally:
        try:
            ps.destroy_model_parallel()
        except Exception:
            pass
        result = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if ctx.rank == 0:
        env = fingerprint(ctx.world)
        record = {**base, "finished_at": _now(), "env": env}
        if first_error:
            record.update(status="failed", error=first_error)
        else:
            record.update(status="ok", metrics=metrics)
        path = append_record(out, record)
        ctx.log(f"{record['status']}: record appended to {path}")
    return intact
