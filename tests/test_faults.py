"""Runs that lose nothing: each fault leaves its record, on real multi-process CPU runs (gloo).

Faults are injected with ``SUITE_INJECT_FAULT`` (documented in ``suite/launch/spmd.py``) into
``tests/scenarios/runner/lossless.toml``:

* ``kill -9`` of rank 1 under bare torchrun: a failed record naming rank 1 and SIGKILL, exit non-zero,
  then ``--resume`` runs the rest; in that run a non-finite loss (``nan``) gives a diverged record with
  its step, and the variant after it still runs;
* a hung rank (``timeout_s`` 5 s): the variant fails within timeout_s plus the guard's grace, naming
  the hung rank;
* Ctrl-C (SIGINT to the launcher's process group): an interrupted record and exit 130;
* a scenario too large for this machine (``scenarios/llama33b.toml`` on a CPU host): refused before
  anything is built, one line naming what it needs and what the machine has, skipped records, exit 2.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from check_worker import subprocess_env

from suite.metrics import hardware
from suite.plan import required_bytes
from suite.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "tests" / "scenarios" / "runner" / "lossless.toml"
LLAMA = ROOT / "scenarios" / "llama33b.toml"
TIMEOUT = 120

slow = pytest.mark.slow  # the multi-process runs


def env(fault: str | None = None) -> dict:
    e = subprocess_env()
    if fault:
        e["SUITE_INJECT_FAULT"] = fault
    return e


def torchrun_cmd(nproc: int, scenario: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "suite", "run", str(scenario), "--out", str(out), *args]


def run(cmd: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(fault), capture_output=True, text=True, timeout=TIMEOUT)


def records(out: Path) -> list[dict]:
    path = out / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def explain(proc) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"


@slow
def test_killed_rank_then_resume_with_a_divergence(tmp_path):
    out = tmp_path / "results"
    killed = run(torchrun_cmd(2, SCENARIO, out), fault="first:2:1:kill")
    assert killed.returncode != 0, explain(killed)
    (rec,) = records(out)  # the process group is gone: the run ends after recording `first`
    assert (rec["variant"], rec["status"]) == ("first", "failed"), explain(killed)
    assert rec["error"]["rank"] == 1 and rec["error"]["signal"] == "SIGKILL", rec["error"]
    assert "rank 1" in rec["error"]["message"]

    resumed = run(torchrun_cmd(2, SCENARIO, out, "--resume"), fault="nan:2::nan")
    assert resumed.returncode == 1, explain(resumed)  # a diverged variant fails the run, after the rest ran
    recs = records(out)
    assert [(r["variant"], r["status"]) for r in recs] == [
        ("first", "failed"), ("first", "ok"), ("nan", "diverged"), ("second", "ok")], explain(resumed)
    nan = recs[2]
    # the hook poisons step index 2, the third step: two finite steps are kept, the divergence is at 3
    assert nan["error"]["type"] == "Diverged" and nan["error"]["step"] == 3
    assert [step for step, _ in nan["metrics"]["loss_curve"]] == [1, 2]
    assert nan["metrics"]["steps"] == 2 and nan["metrics"]["validation_loss"] is None
    assert "non_finite" not in nan  # nothing non-finite reached the record
    ok = recs[1]["metrics"]
    assert 0 < ok["warmup_walltime_s"] <= ok["walltime_s"]


@slow
def test_hung_rank_fails_within_the_timeout(tmp_path):
    out = tmp_path / "results"
    t0 = time.monotonic()
    proc = run(torchrun_cmd(2, SCENARIO, out, "--variant", "first", "--set", "workload.timeout_s=5"),
               fault="first:2:1:hang")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, explain(proc)
    (rec,) = records(out)
    assert (rec["variant"], rec["status"]) == ("first", "failed"), explain(proc)
    err = rec["error"]
    assert err["type"] == "Hang" and err["rank"] == 1, err
    assert "rank 1 made no progress" in err["message"] and "timeout_s = 5" in err["message"]
    assert "--- rank 0 (in a collective)" in err["traceback"] and "--- rank 1 (stopped)" in err["traceback"]
    # start-up (~10 s here) + 2 steps + timeout 5 s + the guard's wait for the peers' stacks (<= 5 s); without
    # the guard gloo would wait timeout_s + 30 s and NCCL would abort the process without a record
    assert elapsed < 45, elapsed


@slow
def test_ctrl_c_leaves_an_interrupted_record_and_exits_130(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "suite", "run", str(SCENARIO), "--out", str(out), "--variant", "first"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env("first:2::hang"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:  # Ctrl-C once the variant is at its second step
        lines.append(line)
        if "injecting 'hang' before step 3" in line:
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends to the whole foreground group
            break
    lines += proc.stdout.readlines()
    rc = proc.wait(timeout=TIMEOUT)
    assert rc == 130, "".join(lines)
    (rec,) = records(out)
    assert (rec["variant"], rec["status"]) == ("first", "interrupted"), "".join(lines)
    assert rec["error"]["signal"] == "SIGINT" and rec["error"]["rank"] == 0


@slow
@pytest.mark.skipif(not ((hardware.ram_available_bytes() or 0) < required_bytes(load_scenario(LLAMA)[0])
                         and hardware.gpu_free_bytes(context=False) is None),
                    reason="this machine could hold LLaMA-33B's weights")
def test_too_large_for_this_machine_is_refused_up_front(tmp_path):
    """No model is built (seconds, not minutes), no OOM: one line per variant naming both sides."""
    launched = run([sys.executable, "-m", "suite", "run", str(LLAMA), "--out", str(tmp_path / "a")])
    assert launched.returncode == 2, explain(launched)
    lines = launched.stderr.strip().splitlines()
    assert len(lines) == 9 and lines[0].startswith("error: variant 'single' needs 1 GPU with >= 68 GiB (plan "
                                                   "estimate 60.6 GiB"), explain(launched)
    assert "this machine has no GPU and" in lines[0] and lines[0].endswith("GiB RAM available.")
    recs = records(tmp_path / "a")
    assert len(recs) == 9 and {r["status"] for r in recs} == {"skipped"}
    assert recs[0]["error"]["message"] == lines[0].removeprefix("error: variant 'single' ")

    t0 = time.monotonic()
    spmd = run(torchrun_cmd(1, LLAMA, tmp_path / "b"))
    assert re.search(r"exitcode\s*:\s*2\b", spmd.stdout + spmd.stderr), explain(spmd)
    assert time.monotonic() - t0 < 60
    recs = {r["variant"]: r for r in records(tmp_path / "b")}
    assert recs["single"]["status"] == "skipped" and "needs 1 GPU with >= 68 GiB" in recs["single"]["error"]["message"]
    assert recs["tp2"]["error"]["message"] == "needs 2 processes; 1 was launched."


def test_launcher_names_rank_and_signal_from_torchruns_summary():
    """When no rank could record (a 1-process variant killed by the OOM killer), the launcher's record
    takes rank and signal from torchrun's summary (this text is torchrun 2.13's, from such a run)."""
    from suite.launch.launcher import _first_failure

    summary = """Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_06:31:43
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 1538)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 1538
=====================================================
"""
    assert _first_failure(["[suite] step 1\n", summary]) == {"rank": 0, "signal": "SIGKILL", "exitcode": -9}
    exited = summary.replace("-9 (pid: 1538)  (SIGKILL)", "2 (pid: 1538)").replace("rank      : 0 (local_rank: 0)",
                                                                                   "rank      : 1 (local_rank: 1)")
    exited = exited.replace("Signal 9 (SIGKILL) received by PID 1538", "To enable traceback see: ...")
    assert _first_failure([exited]) == {"rank": 1, "signal": None, "exitcode": 2}


def test_long_builds_show_progress(monkeypatch):
    """Rank 0 logs elapsed time and memory so far until the first step starts, then stops."""
    import threading

    from suite.launch import spmd

    lines = []
    ctx = spmd.RankContext(rank=0, world=1, local_rank=0)
    monkeypatch.setattr(ctx, "log", lines.append)
    started = threading.Event()
    t = threading.Thread(target=spmd._build_progress, args=(ctx, started, 0.05))
    t.start()
    time.sleep(0.3)
    started.set()
    t.join(timeout=5)
    assert not t.is_alive() and len(lines) >= 2
    assert all(re.fullmatch(r"building: \d+ s, \d+\.\d GiB (resident|allocated on GPU 0)", x) for x in lines), lines
    count = len(lines)
    time.sleep(0.15)
    assert len(lines) == count


def test_memory_check_names_what_the_plan_needs_and_what_the_machine_has(monkeypatch):
    """check_memory on a made-up machine: RAM shared by the local processes without GPUs, each GPU's
    free memory with them; the margin is 10% + 1 GiB over the plan's estimate."""
    from suite.plan import check_memory, memory_per_process

    single, tp2 = load_scenario(LLAMA, [], ["single", "tp2"])
    need = required_bytes(single)
    assert need == int(memory_per_process(single) * 1.1 + 2**30)
    monkeypatch.setattr(hardware, "gpu_free_bytes", lambda index=None, context=True: None)
    monkeypatch.setattr(hardware, "ram_available_bytes", lambda: 23 * 2**30)
    assert check_memory(single, 1) == ("needs 1 GPU with >= 68 GiB (plan estimate 60.6 GiB + 10% + 1.0 GiB); "
                                       "this machine has no GPU and 23.0 GiB RAM available.")
    assert check_memory(tp2, 2).endswith("has no GPU and 23.0 GiB RAM available (11.5 GiB for each of 2 processes).")
    monkeypatch.setattr(hardware, "ram_available_bytes", lambda: 2 * need)
    assert check_memory(single, 1) is None and check_memory(single, 1, local_world=3) is not None
    gib = 2**30
    monkeypatch.setattr(hardware, "gpu_free_bytes",
                        lambda index=None, context=True: [80 * gib] if index is not None else [80 * gib, 30 * gib])
    assert check_memory(single, 1, local_rank=0) is None  # a rank: its own GPU
    assert check_memory(single, 1, gpus=2) is None        # the launcher: the freest GPU
    assert check_memory(tp2, 2, gpus=2) == ("needs 2 GPUs with >= 34 GiB each (plan estimate 30.3 GiB + 10% + "
                                            "1.0 GiB); this machine's 2 freest GPUs have as little as 30.0 GiB free.")
