"""`python -m suite run FILE --slurm partition=P[,time=...,account=...]`: one Slurm job per variant.

Submission goes through submitit (a maintained library that writes the sbatch script, pickles the job
and collects its logs), so suite writes no sbatch text. Each variant's job is sized from its plan:
``world_size`` GPUs over ``ceil(world / gpus_per_node)`` nodes (the world must split evenly), one task
per node, and each task runs ``torchrun`` for its node: ``--standalone`` on one node, else the c10d
rendezvous at the job's first host (port derived from the job id, the rendezvous id is the job id).
The variant itself reaches the ranks resolved (``suite.launch.handoff``), so a job that waits in the
queue runs what was planned at submission; the results folder must be on a filesystem the nodes share.

Keys of ``--slurm`` (comma-separated KEY=VALUE): ``partition`` (required), ``time`` (minutes, or
H:MM:SS, default 60), ``account``, ``qos``, ``constraint``, ``gpus_per_node`` (default 8),
``cpus_per_gpu`` (default 8), ``cluster`` (``slurm``; ``local`` or ``debug`` run the same jobs on this
machine through submitit's local executors, which is how the tests drive this path without Slurm).
On Slurm the command returns after submitting, printing the job ids; local and debug jobs are waited
for. Logs: ``OUT/slurm/<job id>_*``. ``--resume`` skips variants already recorded as ok.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass

from suite.errors import UserError

KEYS = ("partition", "time", "account", "qos", "constraint", "gpus_per_node", "cpus_per_gpu", "cluster")
CLUSTERS = ("slurm", "local", "debug")
FIX = "write --slurm partition=NAME[,time=MINUTES,account=NAME,gpus_per_node=N] (README: Multi-node)."


@dataclass
class SlurmOptions:
    partition: str
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 8
    cpus_per_gpu: int = 8
    cluster: str = "slurm"


def _minutes(text: str) -> int:
    """'90' or '1:30:00' or '2-00:00:00' (Slurm's forms) -> minutes."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0] * 60 + parts[1]
    elif len(parts) == 3:
        minutes = parts[0] * 60 + parts[1] + math.ceil(parts[2] / 60)
    else:
        raise ValueError(text)
    return int(days or 0) * 1440 + minutes


def parse_options(text: str) -> SlurmOptions:
    """The ``--slurm`` value; UserError naming the bad part."""
    given = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not value.strip():
            raise UserError(f"'{part}' is not KEY=VALUE.", key="--slurm", fix=FIX)
        if key not in KEYS:
            from suite.errors import did_you_mean

            raise UserError(f"unknown key '{key}'{did_you_mean(key, KEYS)}.", key="--slurm",
                            fix=f"keys are: {', '.join(KEYS)}.")
        given[key] = value.strip()
    if "partition" not in given:
        raise UserError("no partition given.", key="--slurm", fix=FIX)
    opts = SlurmOptions(partition=given["partition"])
    for key in ("account", "qos", "constraint"):
        setattr(opts, key, given.get(key))
    try:
        if "time" in given:
            opts.time_min = _minutes(given["time"])
        for key in ("gpus_per_node", "cpus_per_gpu"):
            if key in given:
                setattr(opts, key, int(given[key]))
    except ValueError:
        raise UserError(f"'{text}' has a value that is not a number (time: minutes or H:MM:SS).",
                        key="--slurm", fix=FIX) from None
    if opts.time_min < 1 or opts.gpus_per_node < 1 or opts.cpus_per_gpu < 1:
        raise UserError("time, gpus_per_node and cpus_per_gpu must be at least 1.", key="--slurm", fix=FIX)
    opts.cluster = given.get("cluster", "slurm")
    if opts.cluster not in CLUSTERS:
        raise UserError(f"cluster '{opts.cluster}' is not one of {', '.join(CLUSTERS)}.", key="--slurm", fix=FIX)
    return opts


def job_shape(v, world: int, opts: SlurmOptions) -> tuple[int, int]:
    """(nodes, GPUs per node) for a variant of ``world`` processes."""
    nodes = math.ceil(world / opts.gpus_per_node)
    if world % nodes:
        raise UserError(f"needs {world} GPUs, which do not split evenly over {nodes} nodes of at most "
                        f"{opts.gpus_per_node}.", file=v.file, variant=v.name, key="--slurm",
                        fix="set gpus_per_node in --slurm to a divisor of the variant's world size.")
    return nodes, world // nodes


def make_executor(opts: SlurmOptions, folder: str):
    """A submitit executor for ``opts.cluster`` (one seam: the tests replace it)."""
    try:
        import submitit
    except ImportError:
        raise UserError("--slurm needs the submitit package.", key="--slurm",
                        fix="pip install 'suite[slurm]' (or pip install submitit).") from None
    return submitit.AutoExecutor(folder=folder, cluster=opts.cluster)


def node_command(inner: list[str], nodes: int, per_node: int, job_id: str, hosts: list[str]) -> list[str]:
    """The torchrun command one node of the job runs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={per_node}"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        port = 20000 + zlib.crc32(job_id.encode()) % 20000  # same on every node, distinct between jobs
        cmd += [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={hosts[0]}:{port}",
                f"--rdzv-id={job_id}"]
    return cmd + inner


def run_node(inner: list[str], nodes: int, per_node: int, env: dict) -> int:
    """The job's task on one node: torchrun for this node; returns its exit code (submitit records it)."""
    import submitit

    job = submitit.JobEnvironment()
    cmd = node_command(inner, nodes, per_node, str(job.job_id), list(job.hostnames))
    print(f"[suite] node {job.node} of {nodes}: {' '.join(cmd)}", flush=True)
    rc = subprocess.call(cmd, env={**os.environ, **env})
    if rc not in (0, 1):  # 1: a variant failed and was recorded; anything else the job shows as failed
        raise RuntimeError(f"torchrun exited with code {rc}")
    return rc


def submit_all(args) -> int:
    """Submits one job per variant that is not already recorded; waits for local and debug jobs."""
    from suite.launch import handoff
    from suite.records import completed, config_hash
    from suite.scenario import load_scenario

    opts = parse_options(args.slurm)
    variants = load_scenario(args.scenario, args.overrides, args.variants)
    out = os.path.abspath(args.out or os.path.join("results", variants[0].scenario))
    done = completed(out) if args.resume else set()
    shapes = {v.name: job_shape(v, v.world_size(launched=args.nproc), opts) for v in variants}
    executor = make_executor(opts, os.path.join(out, "slurm"))
    jobs = []
    for v in variants:
        if (v.scenario, v.name, config_hash(v.resolved())) in done:
            print(f"[suite] --resume: variant '{v.name}' already recorded in {out}", flush=True)
            continue
        nodes, per_node = shapes[v.name]
        executor.update_parameters(
            name=f"suite-{v.scenario}-{v.name}", nodes=nodes, tasks_per_node=1, gpus_per_node=per_node,
            cpus_per_task=per_node * opts.cpus_per_gpu, timeout_min=opts.time_min,
            slurm_partition=opts.partition,
            **{f"slurm_{k}": getattr(opts, k) for k in ("account", "qos", "constraint") if getattr(opts, k)})
        handed = handoff.write([v], out, f"{v.name}.slurm.{os.getpid()}")
        inner = ["-m", "suite", "run", os.path.abspath(v.file), "--variant", v.name, "--out", out]
        job = executor.submit(run_node, inner, nodes, per_node, {handoff.ENV: str(handed)})
        print(f"[suite] variant '{v.name}': job {job.job_id} ({nodes} node{'s' * (nodes > 1)} x "
              f"{per_node} GPU{'s' * (per_node > 1)}, partition {opts.partition})", flush=True)
        jobs.append((v, job, handed))
    if opts.cluster == "slurm":
        print(f"[suite] submitted {len(jobs)} job(s); logs in {os.path.join(out, 'slurm')}, records in "
              f"{out}/records.jsonl", flush=True)
        return 0
    failed = False
    for v, job, handed in jobs:  # local and debug jobs run here: wait, as the launcher does
        try:
            failed |= job.result() != 0
        except Exception as e:
            print(f"error: variant '{v.name}': job {job.job_id} failed: {e}", file=sys.stderr, flush=True)
            failed = True
        handoff.remove(handed)
    return 1 if failed else 0
