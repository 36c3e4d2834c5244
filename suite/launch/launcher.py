"""`python -m suite run FILE` outside torchrun: one torchrun per variant, sized for that variant.

Each variant runs in its own process group, so a crash, OOM or hang in one variant cannot take
the next one down: if torchrun exits non-zero before the variant recorded anything, the launcher
appends the failure record itself, with the tail of the output.
"""
from __future__ import annotations

import collections
import datetime as dt
import os
import subprocess
import sys

from suite.records import append_record, completed, config_hash, read_records, records_path
from suite.scenario import load_scenario


def _available_gpus() -> int | None:
    """GPUs on this host, or None on a CPU-only machine (processes are then not limited)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else None
    except ImportError:
        return None


def _count_records(out: str, v) -> int:
    path = records_path(out)
    if not path.exists():
        return 0
    return sum(1 for r in read_records(path) if r["variant"] == v.name and r["scenario"] == v.scenario)


def _first_traceback(lines: list[str]) -> str:
    """The child's own traceback (it comes before torchrun's summary), else the output's tail."""
    start = next((i for i, line in enumerate(lines) if "Traceback" in line), None)
    text = "".join(lines[start:] if start is not None else lines)
    return text[:4000] if start is not None else text[-4000:]


def launch_all(args) -> int:
    variants = load_scenario(args.scenario, args.overrides, args.variants)
    out = args.out or os.path.join("results", variants[0].scenario)
    done = completed(out) if args.resume else set()
    gpus = _available_gpus()
    status = 0
    for v in variants:
        nproc = v.world_size(launched=args.nproc)
        if (v.scenario, v.name, config_hash(v.resolved())) in done:
            print(f"[suite] --resume: variant '{v.name}' already recorded in {out}", flush=True)
            continue
        if gpus is not None and nproc > gpus:
            print(f"[suite] skipping variant '{v.name}': needs {nproc} GPUs, this host has {gpus}.", flush=True)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "suite", "run", args.scenario, "--variant", v.name, "--out", out]
        for o in args.overrides:
            cmd += ["--set", o]
        before = _count_records(out, v)
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        print(f"[suite] launching variant '{v.name}' on {nproc} process(es)", flush=True)
        tail = collections.deque(maxlen=400)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
        rc = proc.wait()
        if rc != 0:
            status = 1
            if _count_records(out, v) == before:
                resolved = v.resolved()
                append_record(out, {
                    "status": "failed", "scenario": v.scenario, "scenario_file": v.file, "variant": v.name,
                    "is_baseline": v.is_baseline, "config_hash": config_hash(resolved), "config": resolved,
                    "started_at": started,
                    "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join(cmd), "world_size": nproc, "tp": v.parallel.tp, "pp": v.parallel.pp,
                    "dp": nproc // (v.parallel.tp * v.parallel.pp), "env": None,
                    "error": {"type": "ProcessExit", "message": f"torchrun exited with code {rc}",
                              "traceback": _first_traceback(list(tail)), "rank": None},
                })
    return status
