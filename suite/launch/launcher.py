"""`python -m suite run FILE` outside torchrun: one torchrun per variant, sized for that variant.

The launcher resolves the scenario once and hands each torchrun its variant as a file
(``suite.launch.handoff``). Each variant runs in its own process group, so a crash, OOM or hang in one variant cannot take
the next one down. Before starting a variant the launcher checks that it fits this machine: more
GPUs than the host has, or more memory per process than its GPUs (or, without GPUs, its RAM) have
free (``suite.plan.check_memory``), leaves a ``skipped`` record with the reason instead of starting
it. If torchrun exits non-zero before the variant recorded anything (a rank died before rank 0 could
write), the launcher appends the failure record itself, naming the rank and the signal from
torchrun's own exit summary, with the tail of the output. Ctrl-C stops the variant (its ranks
record it as ``interrupted``) and the launcher, which exits 130.

Exit status: 130 when interrupted; else 1 when any variant failed or diverged; else 2 when a variant
was refused because it cannot fit this machine's memory; else 0 (variants skipped for want of GPUs
included, as a nightly on a smaller runner needs).
"""
from __future__ import annotations

import collections
import datetime as dt
import os
import re
import signal
import subprocess
import sys

from suite.launch import handoff
from suite.records import append_record, completed, config_hash, read_records, records_path
from suite.scenario import load_scenario


# cuBLAS's documented setting for bitwise-repeatable results ([workload] deterministic, suite.launch.spmd)
CUBLAS_DETERMINISTIC = ":4096:8"


def _available_gpus() -> int | None:
    """GPUs on this host, or None on a CPU-only machine (processes are then not limited)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else None
    except ImportError:
        return None


def _records_of(out: str, v) -> list[dict]:
    path = records_path(out)
    if not path.exists():
        return []
    return [r for r in read_records(path) if r["variant"] == v.name and r["scenario"] == v.scenario]


def _first_traceback(lines: list[str]) -> str:
    """The child's own traceback (it comes before torchrun's summary), else the output's tail."""
    start = next((i for i, line in enumerate(lines) if "Traceback" in line), None)
    text = "".join(lines[start:] if start is not None else lines)
    return text[:4000] if start is not None else text[-4000:]


def _first_failure(lines: list[str]) -> dict:
    """{'rank', 'signal', 'exitcode'} of the root cause in torchrun's exit summary (its "Root Cause"
    block lists the first failed worker: rank, exitcode, and for a signal "Signal 9 (SIGKILL)")."""
    text = "".join(lines)
    root = text[text.rfind("Root Cause"):] if "Root Cause" in text else text
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    sig = re.search(r"Signal \d+ \((SIG[A-Z0-9]+)\)", root)
    name = sig.group(1) if sig else None
    if name is None and code and int(code.group(1)) < 0:
        try:
            name = signal.Signals(-int(code.group(1))).name
        except ValueError:
            pass
    return {"rank": int(rank.group(1)) if rank else None, "signal": name,
            "exitcode": int(code.group(1)) if code else None}


def launch_all(args) -> int:
    from suite.launch.spmd import skipped_record
    from suite.plan import check_memory

    variants = load_scenario(args.scenario, args.overrides, args.variants)
    out = args.out or os.path.join("results", variants[0].scenario)
    done = completed(out) if args.resume else set()
    gpus = _available_gpus()
    failed = refused = False
    for v in variants:
        nproc = v.world_size(launched=args.nproc)
        if (v.scenario, v.name, config_hash(v.resolved())) in done:
            print(f"[suite] --resume: variant '{v.name}' already recorded in {out}", flush=True)
            continue
        if gpus is not None and nproc > gpus:
            reason = f"needs {nproc} GPUs; this host has {gpus}."
            print(f"[suite] skipping variant '{v.name}': {reason}", flush=True)
            append_record(out, skipped_record(v, nproc, reason, command=" ".join(sys.argv)))
            continue
        reason = check_memory(v, nproc, gpus=gpus)
        if reason:
            print(f"error: variant '{v.name}' {reason}", file=sys.stderr, flush=True)
            append_record(out, skipped_record(v, nproc, reason, command=" ".join(sys.argv)))
            refused = True
            continue
        rc, interrupted = _launch(v, nproc, out, args)
        if interrupted:
            return 130
        latest = (_records_of(out, v) or [{}])[-1].get("status")
        if latest == "skipped":  # refused by its ranks (GPU memory the launcher could not read)
            refused = True
        else:
            failed |= rc != 0 or latest in ("failed", "diverged")
    return 1 if failed else 2 if refused else 0


def _launch(v, nproc: int, out: str, args) -> tuple[int, bool]:
    """Runs one variant in its own torchrun; (torchrun's exit code, whether Ctrl-C stopped it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "suite", "run", args.scenario, "--variant", v.name, "--out", out]
    for o in args.overrides:
        cmd += ["--set", o]
    if getattr(args, "verbose", False):
        cmd.append("--verbose")
    before = len(_records_of(out, v))
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(f"[suite] launching variant '{v.name}' on {nproc} process(es)", flush=True)
    tail = collections.deque(maxlen=400)
    handed = handoff.write([v], out, f"{v.name}.{os.getpid()}")  # the ranks run what was resolved here
    env = {**os.environ, handoff.ENV: str(handed)}
    if v.workload.deterministic:  # cuBLAS reads it when it starts, so the ranks' environment carries it
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    interrupted = False
    while True:
        try:  # Ctrl-C reaches torchrun and its ranks too (one process group): let them finish recording
            for line in proc.stdout:
                sys.stdout.write(line)
                tail.append(line)
            break
        except KeyboardInterrupt:
            interrupted = True
    rc = proc.wait()
    handoff.remove(handed)
    if len(_records_of(out, v)) > before:
        return rc, interrupted
    if rc == 0 and not interrupted:
        return rc, interrupted
    cause = _first_failure(list(tail))
    if interrupted:
        status, error = "interrupted", {"type": "Interrupted", "message": "interrupted by SIGINT (Ctrl-C) "
                                        "before the variant recorded anything", "signal": "SIGINT", "rank": None}
    else:
        what = f"killed by {cause['signal']}" if cause["signal"] else f"exited with code {cause['exitcode']}"
        rank = f"rank {cause['rank']}" if cause["rank"] is not None else "a rank"
        status, error = "failed", {"type": "RankKilled" if cause["signal"] else "ProcessExit",
                                   "message": f"{rank} {what} before the variant recorded anything "
                                              f"(torchrun exited with code {rc})",
                                   "rank": cause["rank"], **({"signal": cause["signal"]} if cause["signal"] else {})}
    resolved = v.resolved()
    append_record(out, {
        "status": status, "scenario": v.scenario, "scenario_file": v.file, "variant": v.name,
        "is_baseline": v.is_baseline, "config_hash": config_hash(resolved), "config": resolved,
        "started_at": started, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(cmd), "world_size": nproc, "tp": v.parallel.tp, "pp": v.parallel.pp,
        "dp": nproc // (v.parallel.tp * v.parallel.pp), "env": None,
        "error": {**error, "traceback": _first_traceback(list(tail))},
    })
    return rc, interrupted
