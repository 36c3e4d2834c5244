"""``suite export --format pytest-benchmark RESULTS -o FILE.json``: suite results as pytest-benchmark data.

Why. pytest-benchmark already has the tools people use on timing data: ``pytest-benchmark compare``
(tables across saved runs, ``--histogram`` box plots, ``--csv``) and its storage layout. Writing its
JSON format, rather than a look-alike, lets those tools read suite runs unchanged.

What is exported: every time measure (``kind = "time"``) of the latest record of each variant that kept
raw samples (schema 2), converted to seconds, one benchmark each:

    group     "<scenario>/<measure>" (e.g. "llama33b/decode_latency"): comparable rows stay together
    name      "<variant>::<measure>[<point>]", fullname with the scenario in front
    params    the measure's point (batch, prompt, gen, graph / V-cycle phase / kept length), or null
    stats     pytest-benchmark's own statistics (its ``Stats`` class) over the samples; ``data`` holds
              the samples, ``iterations`` is 1 (one sample = one step or one request)
    extra_info  unit as recorded, direction, compare method, config_hash, status

``machine_info`` and ``commit_info`` come from the records' environment (host, CPU, Python, GPU,
driver, CUDA, torch, megatron-core, git commit). Summary-only measures (schema-1 records) have no
samples to put in ``data`` and are left out, with a note on stderr.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from suite.errors import UserError
from suite.report.select import load_latest

TO_SECONDS = {"s": 1.0, "ms": 1e-3, "ms/token": 1e-3, "us": 1e-6}


def _stats_class():
    try:
        from pytest_benchmark.stats import Stats
    except ImportError:
        raise UserError("--format pytest-benchmark needs the pytest-benchmark package.",
                        fix="pip install pytest-benchmark (it is in suite's dev extra: pip install -e '.[dev]').") from None
    return Stats


def _point_text(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def benchmark(rec: dict, measure: dict, stats_cls) -> dict | None:
    """One pytest-benchmark entry for a time measure with samples; None when it has none."""
    scale = TO_SECONDS.get(measure.get("unit"))
    samples = [s * scale for s in (measure.get("samples") or []) if isinstance(s, (int, float))] if scale else []
    if not samples:
        return None
    stats = stats_cls()
    for s in samples:
        stats.update(s)
    point = measure.get("point") or {}
    suffix = f"[{_point_text(point)}]" if point else ""
    name = f"{rec['variant']}::{measure['name']}{suffix}"
    return {
        "group": f"{rec['scenario']}/{measure['name']}",
        "name": name,
        "fullname": f"{rec['scenario']}/{name}",
        "params": dict(point) or None,
        "param": _point_text(point) or None,
        "extra_info": {"unit": measure.get("unit"), "direction": measure.get("direction"),
                       "compare": measure.get("compare"), "config_hash": rec.get("config_hash"),
                       "status": rec.get("status"), "scenario": rec.get("scenario"), "variant": rec.get("variant")},
        "options": {"timer": "suite", "min_rounds": len(samples), "warmup": False, "disable_gc": False,
                    "max_time": None, "min_time": None},
        "stats": {**stats.as_dict(), "data": samples, "iterations": 1},
    }


def machine_info(env: dict) -> dict:
    """pytest-benchmark's machine_info keys, filled from a record's environment (plus the GPU stack)."""
    python = env.get("python") or ""
    return {"node": env.get("hostname"), "processor": env.get("cpu"), "machine": env.get("cpu"),
            "python_compiler": "", "python_implementation": "CPython", "python_implementation_version": python,
            "python_version": python, "python_build": [], "release": "", "system": "Linux",
            "cpu": {"brand_raw": env.get("cpu")},
            **{k: env.get(k) for k in ("gpu_name", "gpu_count", "driver", "cuda", "nccl", "torch", "megatron_core")}}


def commit_info(env: dict, when: str | None) -> dict:
    commit = env.get("git_commit") or ""
    return {"id": commit.removesuffix("-dirty") or None, "time": when, "author_time": when,
            "dirty": commit.endswith("-dirty"), "project": "suite", "branch": None}


def to_pytest_benchmark(latest: dict) -> tuple[dict, list[str]]:
    """(the JSON document, names of time measures left out for want of samples)."""
    from importlib.metadata import version

    stats_cls = _stats_class()
    benchmarks, skipped = [], []
    for rec in latest.values():
        for m in rec.get("measures") or []:
            if m.get("kind") != "time" or m.get("compare") == "info":
                continue
            entry = benchmark(rec, m, stats_cls)
            if entry is None:
                skipped.append(f"{rec['scenario']}/{rec['variant']}::{m.get('name')}")
            else:
                benchmarks.append(entry)
    first = next(iter(latest.values()))
    env = first.get("env") or {}
    when = first.get("finished_at") or first.get("started_at")
    doc = {"machine_info": machine_info(env), "commit_info": commit_info(env, when), "benchmarks": benchmarks,
           "datetime": when, "version": version("pytest-benchmark")}
    return doc, skipped


def export_command(args) -> int:
    latest = load_latest(args.results)
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"-o {args.output} is a folder.", fix="name the JSON file to write, e.g. -o results/run.json.")
    doc, skipped = to_pytest_benchmark(latest)
    if not doc["benchmarks"]:
        raise UserError("no time measure with raw samples to export (schema-1 records keep only summaries).",
                        file=", ".join(map(str, args.results)),
                        fix="export results written by this version of `suite run`.")
    if skipped:
        print(f"note: {len(skipped)} time measure(s) without raw samples left out: {', '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""), file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"wrote {len(doc['benchmarks'])} benchmark(s) to {out}")
    return 0
