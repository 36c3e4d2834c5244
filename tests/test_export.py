"""`suite export --format pytest-benchmark`: pytest-benchmark's own tools read the exported runs.

Two schema-2 result sets (a training step-time measure per V-cycle phase and a decode-latency grid in
ms/token) are exported, then pytest-benchmark itself loads them: its storage loader (the numbers come
back in seconds, ``data`` holds the samples) and its ``compare`` command (a CSV and SVG histograms).
"""
from __future__ import annotations

import csv
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from check_worker import ROOT, run_suite, subprocess_env  # noqa: E402

pytest.importorskip("pytest_benchmark")


def measure(name, unit, samples, **point) -> dict:
    return {"name": name, "unit": unit, "kind": "time", "direction": "lower", "compare": "median",
            "point": point, "value": statistics.median(samples), "samples": samples}


def record(variant: str, slow: float, seed: int) -> dict:
    rng = random.Random(seed)
    steps = {phase: [t * slow * (1 + rng.gauss(0, 0.01)) for _ in range(12)] for phase, t in ((0, 0.15), (1, 0.03))}
    decode = [22.6 * slow * (1 + rng.gauss(0, 0.02)) for _ in range(16)]
    measures = [measure("step_time", "s", s, phase=p) for p, s in steps.items()]
    measures.append(measure("decode_latency", "ms/token", decode, batch=1, prompt=2048, gen=32, graph="on"))
    measures.append({"name": "peak_memory", "unit": "bytes", "kind": "memory", "direction": "lower",
                     "compare": "tolerance", "tolerance": 0.05, "point": {}, "value": 1.2e10})
    return {"schema": 2, "status": "ok", "scenario": "nightly", "variant": variant, "config_hash": "abc",
            "config": {}, "started_at": "2026-11-29T02:17:00+00:00", "finished_at": "2026-11-29T02:30:00+00:00",
            "env": {"gpu_name": "NVIDIA H200", "gpu_count": 1, "hostname": "gpu-1", "cpu": "x86_64",
                    "python": "3.12.3", "torch": "2.11.0", "git_commit": "0123abcd-dirty"},
            "measures": measures}


def export(tmp_path: Path, name: str, slow: float, seed: int) -> tuple[Path, dict]:
    rec = record("dense", slow, seed)
    src = tmp_path / f"{name}.jsonl"
    src.write_text(json.dumps(rec) + "\n")
    out = tmp_path / "store" / f"000{seed}_{name}.json"
    proc = run_suite("export", "--format", "pytest-benchmark", src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 benchmark(s)" in proc.stdout
    return out, rec


def test_pytest_benchmark_reads_the_export(tmp_path):
    from pytest_benchmark.logger import Logger
    from pytest_benchmark.storage.file import FileStorage

    first, rec = export(tmp_path, "night1", 1.0, 1)
    second, _ = export(tmp_path, "night2", 1.10, 2)

    # Its storage loader: three benchmarks a file, in seconds, stats over exactly the samples.
    storage = FileStorage(tmp_path / "store", logger=Logger(Logger.QUIET))
    loaded = list(storage.load_benchmarks(str(first), str(second)))
    assert len(loaded) == 6
    decode = next(b for b in loaded if b["name"] == "dense::decode_latency[batch=1,prompt=2048,gen=32,graph=on]"
                  and b["source"].endswith("night1"))
    samples = [s / 1000 for s in rec["measures"][2]["samples"]]
    assert decode["data"] == pytest.approx(samples)
    assert decode["median"] == pytest.approx(statistics.median(samples))
    assert decode["stddev"] == pytest.approx(statistics.stdev(samples))
    assert decode["rounds"] == 16 and decode["group"] == "nightly/decode_latency"
    assert decode["params"] == {"batch": 1, "prompt": 2048, "gen": 32, "graph": "on"}
    doc = json.loads(first.read_text())
    assert doc["machine_info"]["gpu_name"] == "NVIDIA H200" and doc["commit_info"]["dirty"] is True

    # Its compare command: a CSV of both runs and one SVG histogram per group.
    proc = subprocess.run([sys.executable, "-m", "pytest_benchmark", "--storage", f"file://{tmp_path / 'store'}",
                           "compare", str(first), str(second), "--csv", str(tmp_path / "cmp.csv"),
                           "--histogram", str(tmp_path / "hist")],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "cmp.csv").open()))
    assert len(rows) == 6
    medians = sorted(float(r["median"]) for r in rows if r["name"] == "nightly/dense::step_time[phase=1]")
    assert len(medians) == 2 and medians[1] / medians[0] == pytest.approx(1.10, rel=0.03)
    svgs = sorted(p.name for p in tmp_path.glob("hist*.svg"))
    assert len(svgs) == 2 and all((tmp_path / s).read_text().lstrip().startswith("<?xml") for s in svgs), svgs


def test_export_without_samples_is_a_user_error(tmp_path):
    """Schema-1 records keep only summaries: nothing to put in pytest-benchmark's `data`."""
    proc = run_suite("export", ROOT / "reports" / "records" / "gpt1b_parallel_h100.jsonl", "-o", tmp_path / "x.json")
    assert proc.returncode == 2 and "no time measure with raw samples" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.json").exists()
