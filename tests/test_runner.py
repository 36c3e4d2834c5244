"""The runner end to end: real multi-process runs under torchrun (gloo on CPU) and the launcher.

Every run here is a tiny model for a few steps; runs are shared between tests through module-scoped
fixtures so the whole file costs a handful of torchrun starts:

* ``equivalence``: one ``torchrun --nproc-per-node 2`` of dp / tp2 / tp2_sp / pp2 / dp3 (skipped), plus one
  1-process run of dp alone;
* ``faults``: a run with ``SUITE_INJECT_FAULT="first:3"``, then ``--resume`` without the fault;
* ``launcher``: ``python -m suite run`` (one torchrun per variant) with a fault on rank 1 only;
* ``bad``: a malformed scenario under torchrun.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from suite.metrics.flops import Shape, train_step_flops
from suite import RECORD_SCHEMA_VERSION
from suite.records import config_hash
from suite.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "scenarios" / "runner"
EQUIV = SCENARIOS / "equivalence.toml"
FAULTS = SCENARIOS / "faults.toml"
LAUNCHER = SCENARIOS / "launcher.toml"
BAD = SCENARIOS / "bad.toml"

TIMEOUT = 300  # per subprocess; every run here takes seconds, a hang fails the test instead of CI

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key in ("SUITE_INJECT_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun(nproc: int, scenario: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "suite", "run", str(scenario), "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)


def launcher(scenario: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "suite", "run", str(scenario), "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)


def records(out: Path) -> list[dict]:
    path = out / "records.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_variant(recs: list[dict]) -> dict[str, dict]:
    out = {}
    for r in recs:
        assert r["variant"] not in out, f"two records for variant {r['variant']}"
        out[r["variant"]] = r
    return out


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def losses(record: dict) -> list[float]:
    return [loss for _, loss in record["metrics"]["loss_curve"]]


# --- equivalence: dp / tp2 / pp2 on 2 processes, dp on 1 process -------------------------------------

@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    base = tmp_path_factory.mktemp("equivalence")
    two = torchrun(2, EQUIV, base / "two")
    assert two.returncode == 0, explain(two)
    one = torchrun(1, EQUIV, base / "one", "--variant", "dp")
    assert one.returncode == 0, explain(one)
    recs = by_variant(records(base / "two"))
    return {"two": two, "one": one, "recs": {k: r for k, r in recs.items() if r["status"] != "skipped"},
            "skipped": {k: r for k, r in recs.items() if r["status"] == "skipped"},
            "single": by_variant(records(base / "one"))}


def test_equivalence_runs_every_fitting_variant(equivalence):
    recs = equivalence["recs"]
    assert sorted(recs) == ["dp", "dp_sgd", "pp2", "tp2", "tp2_sp", "tp2_sp_sgd"]
    assert all(r["status"] == "ok" for r in recs.values()), {k: r.get("error") for k, r in recs.items()}
    layout = {k: (r["world_size"], r["tp"], r["pp"], r["dp"]) for k, r in recs.items()}
    assert layout == {"dp": (2, 1, 1, 2), "tp2": (2, 2, 1, 1), "tp2_sp": (2, 2, 1, 1), "pp2": (2, 1, 2, 1),
                      "dp_sgd": (2, 1, 1, 2), "tp2_sp_sgd": (2, 2, 1, 1)}
    assert recs["tp2_sp"]["config"]["parallel"]["sequence_parallel"] is True
    single = equivalence["single"]["dp"]
    assert single["status"] == "ok"
    assert (single["world_size"], single["tp"], single["pp"], single["dp"]) == (1, 1, 1, 1)
    # the same scenario and global batch: the 1-process run is the same configuration
    assert single["config_hash"] == recs["dp"]["config_hash"]
    assert single["config"]["workload"]["global_batch"] == 8


def test_tp_and_pp_loss_curves_match_dp(equivalence):
    """TP=2 (also with sequence parallelism, whose norms' weight gradients are summed over the TP ranks) and
    PP=2 train the same function as DP=2: training losses equal step by step, rtol 1e-4.

    Initialisation is drawn per full (unsharded) tensor and every layout sees the same global batch,
    so the curves agree to float32 reduction-order noise (identical to 5 decimals over 30 steps).
    """
    recs = equivalence["recs"]
    ref = losses(recs["dp"])
    assert len(ref) == 8
    for name in ("tp2", "tp2_sp", "pp2"):
        got = losses(recs[name])
        assert len(got) == len(ref)
        for step, (a, b) in enumerate(zip(ref, got), 1):
            assert b == pytest.approx(a, rel=1e-4), f"{name} step {step}: {b} vs dp {a}"


def test_sequence_parallel_sums_the_norms_gradients_over_tp(equivalence):
    """Under sequence parallelism each TP rank norms half the sequence, so the norms' weight gradients must be
    summed over the TP ranks (suite.models.gpt.TorchNorm marks them for megatron's finalize_model_grads).
    With plain SGD at rate 0.5 the losses equal DP's to 1.2e-7 relative; with the gradients left unsummed
    they drift by 2.2e-3 within 8 steps (measured on this CPU machine): rtol 1e-5 tells them apart."""
    recs = equivalence["recs"]
    ref, got = losses(recs["dp_sgd"]), losses(recs["tp2_sp_sgd"])
    assert len(got) == len(ref) == 8
    assert ref[-1] < ref[0]  # it trains
    for step, (a, b) in enumerate(zip(ref, got), 1):
        assert b == pytest.approx(a, rel=1e-5), f"step {step}: tp2_sp {b} vs dp {a}"


def test_single_process_loss_curve_matches_dp(equivalence):
    """A 1-process TP=1 DP=1 run of the same scenario (same global batch) matches DP=2, rtol 1e-4."""
    ref = losses(equivalence["recs"]["dp"])
    got = losses(equivalence["single"]["dp"])
    assert len(got) == len(ref)
    for step, (a, b) in enumerate(zip(ref, got), 1):
        assert b == pytest.approx(a, rel=1e-4), f"1 process step {step}: {b} vs dp=2 {a}"


def test_validation_losses_match(equivalence):
    """Validation losses of dp (DP=2), tp2, tp2_sp, pp2 and the 1-process run agree within 1e-3 relative.

    Validation must score the same held-out windows at every layout (it once scored dp*micro_batch
    windows per batch, so DP=2 saw twice the data of TP=2 and differed by ~1%).
    """
    recs = equivalence["recs"]
    ref = recs["dp"]["metrics"]["validation_loss"]
    assert ref is not None and math.isfinite(ref)
    for got in (recs["tp2"], recs["tp2_sp"], recs["pp2"], equivalence["single"]["dp"]):
        assert got["metrics"]["validation_loss"] == pytest.approx(ref, rel=1e-3), got["variant"]


def test_heldout_text_metrics_are_the_validation_loss_computed_another_way(equivalence):
    """metrics.heldout of every layout: the final model scored on the validation tail in rolling windows
    (suite.eval: logits gathered over TP, log-softmax, broadcast over PP). By default it scores as many
    tokens as one validation, and rolling windows of seq_length over the tail's start are exactly the
    windows validation reads, so its loss must be the validation loss (megatron's vocab-parallel
    cross-entropy of the same model on the same tokens; measured equal to 2e-8 relative)."""
    recs = {**equivalence["recs"], "single": equivalence["single"]["dp"]}
    for name, rec in recs.items():
        w, m = rec["config"]["workload"], rec["metrics"]
        held = m["heldout"]
        assert held is not None, name
        scored = w["eval_batches"] * w["global_batch"] * w["seq_length"]
        assert (held["tokens"], held["bytes"], held["seq_length"]) == (scored, scored, 64) == (1024, 1024, 64)
        assert held["loss"] == pytest.approx(m["validation_loss"], rel=1e-5), name
        assert held["perplexity"] == pytest.approx(math.exp(held["loss"]), rel=1e-12)
        assert held["bpb"] == pytest.approx(held["loss"] / math.log(2), rel=1e-12)  # bytes: 1 a token
        same_training = recs["dp_sgd" if w["optimizer"] == "sgd" else "dp"]
        assert held["loss"] == pytest.approx(same_training["metrics"]["heldout"]["loss"], rel=1e-5), name
    assert recs["dp"]["metrics"]["heldout"]["loss"] < math.log(256) - 0.5  # the trained model, not the initial one


def test_gqa_model_actually_trains(equivalence):
    """The curve starts at the uniform-prediction loss ln(vocab) (within 2%) and clearly decreases."""
    rec = equivalence["recs"]["dp"]
    model = rec["config"]["model"]
    assert (model["num_attention_heads"], model["num_query_groups"]) == (4, 2)  # grouped-query attention
    curve = losses(rec)
    assert curve[0] == pytest.approx(math.log(256), rel=0.02)
    assert curve[-1] < curve[0] - 0.5, curve
    assert rec["metrics"]["validation_loss"] < curve[0] - 0.5


def test_records_schema(equivalence):
    recs = equivalence["recs"]
    specs = {v.name: v for v in load_scenario(EQUIV)}
    assert [r["is_baseline"] for r in (recs["dp"], recs["tp2"], recs["pp2"])] == [True, False, False]
    for name, r in recs.items():
        spec = specs[name]
        w = spec.workload
        assert r["schema"] == RECORD_SCHEMA_VERSION == 2
        assert r["status"] == "ok"
        assert r["scenario"] == "runner_equivalence"
        assert r["variant"] == name
        assert r["config"] == json.loads(json.dumps(spec.resolved()))
        assert r["config_hash"] == config_hash(spec.resolved()) == config_hash(r["config"])
        assert "error" not in r
        assert r["env"]["torch"] == version("torch")
        assert r["env"]["processes"] == 2
        m = r["metrics"]
        assert m["steps"] == w.steps == 8
        assert m["timed_steps"] == w.steps - w.warmup_steps
        st = m["step_time_s"]
        assert st["n"] == m["timed_steps"]
        assert st["median"] > 0 and st["min"] <= st["median"] <= st["max"]
        assert m["tokens"] == w.steps * w.global_batch * w.seq_length == 8 * 8 * 64
        assert m["flops_per_step"] == train_step_flops(Shape.of(spec.model), w.global_batch, w.seq_length)
        assert m["flops_total"] == w.steps * m["flops_per_step"]
        # all work over all time of the timed steps (constant FLOPs per step here: f / mean step time)
        assert m["tflops_per_gpu"] == pytest.approx(m["flops_per_step"] / st["mean"] / 2 / 1e12, rel=1e-9)
        assert m["tokens_per_s"] == pytest.approx(w.global_batch * w.seq_length / st["median"], rel=1e-9)
        assert m["mfu"] is None
        assert m["peak_memory_bytes"] > 0 and m["memory_kind"] == "cpu_max_rss"
        assert m["energy_j"] is None and m["avg_power_w"] is None
        assert len(m["loss_curve"]) == w.steps
        assert [step for step, _ in m["loss_curve"]] == list(range(1, w.steps + 1))
        assert m["final_loss"] == pytest.approx(sum(losses(r)[-5:]) / 5)
        # eval_interval 0: one validation, at the end ([step, loss, walltime so far, FLOPs so far])
        (last,) = m["validation_curve"]
        assert last[:2] == [w.steps, m["validation_loss"]] and last[3] == m["flops_total"]
        assert m["walltime_s"] >= st["mean"] * st["n"] * (1 - 1e-9)  # all steps, warm-up included


def test_variant_that_does_not_fit_is_skipped(equivalence):
    """dp = 3 under 2 processes: a short skip line naming the variant (rank 0 only) and a skipped record
    with the reason; the run still exits 0."""
    out = equivalence["two"].stdout
    skips = [line for line in out.splitlines() if "skipping variant 'dp3'" in line]
    assert len(skips) == 1, out
    assert skips[0].endswith("skipping variant 'dp3': needs 3 processes; 2 were launched (`python -m suite run` sizes "
                             "each variant itself).")
    assert list(equivalence["skipped"]) == ["dp3"]
    rec = equivalence["skipped"]["dp3"]
    assert "metrics" not in rec
    assert rec["error"]["message"] == "needs 3 processes; 2 were launched."
    assert equivalence["two"].returncode == 0


# --- failure, continue, resume -------------------------------------------------------------------

@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "results"
    first = torchrun(2, FAULTS, out, SUITE_INJECT_FAULT="first:3")
    before = (out / "records.jsonl").read_bytes()
    resumed = torchrun(2, FAULTS, out, "--resume")
    after = (out / "records.jsonl").read_bytes()
    return {"first": first, "resumed": resumed, "before": before, "after": after, "out": out}


def test_failed_variant_is_recorded_and_the_next_runs(faults):
    proc = faults["first"]
    assert proc.returncode == 1, explain(proc)  # a failed variant fails the run, after the others ran
    recs = [json.loads(line) for line in faults["before"].decode().splitlines()]
    assert [(r["variant"], r["status"]) for r in recs] == [("first", "failed"), ("second", "ok")]
    failed = recs[0]
    assert "injected fault" in failed["error"]["message"]
    assert failed["error"]["type"] == "RuntimeError"
    assert "metrics" not in failed
    assert failed["schema"] == RECORD_SCHEMA_VERSION and failed["config_hash"] == recs[1]["config_hash"]


def test_resume_runs_only_what_did_not_succeed(faults):
    proc = faults["resumed"]
    assert proc.returncode == 0, explain(proc)
    assert "variant 'second' already recorded" in proc.stdout
    assert "runner_faults/second] start" not in proc.stdout
    assert "runner_faults/first] start" in proc.stdout
    recs = records(faults["out"])
    assert [(r["variant"], r["status"]) for r in recs] == [("first", "failed"), ("second", "ok"), ("first", "ok")]
    # appended only: the earlier lines are byte-identical
    assert faults["after"].startswith(faults["before"])
    assert len(faults["after"]) > len(faults["before"])


# --- launcher: one torchrun per variant ----------------------------------------------------------

@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("launcher") / "results"
    proc = launcher(LAUNCHER, out, SUITE_INJECT_FAULT="v:2:1")
    return {"proc": proc, "recs": by_variant(records(out))}


def test_launcher_sizes_each_variant(launched):
    """A 1-process variant and a tp = 2 (dp = 1) variant each get their own torchrun."""
    out = launched["proc"].stdout
    assert "launching variant 'single' on 1 process(es)" in out
    assert "launching variant 'tp2' on 2 process(es)" in out
    recs = launched["recs"]
    assert recs["single"]["status"] == "ok" and recs["single"]["world_size"] == 1
    assert recs["tp2"]["status"] == "ok"
    assert (recs["tp2"]["world_size"], recs["tp2"]["tp"], recs["tp2"]["dp"]) == (2, 2, 1)
    assert losses(recs["tp2"]) == pytest.approx(losses(recs["single"]), rel=1e-4)


def test_launcher_survives_a_fault_on_one_rank(launched):
    """Rank 1 alone fails: the variant ends (no hang) with a failed record, the next variant runs, exit 1."""
    proc = launched["proc"]
    assert proc.returncode == 1, explain(proc)
    assert "injected fault at step 2 on rank 1" in proc.stdout + proc.stderr
    recs = launched["recs"]
    assert sorted(recs) == ["after", "single", "tp2", "v"]
    assert recs["v"]["status"] == "failed" and recs["v"]["world_size"] == 2
    # the record names rank 1's own error, not rank 0's timeout (rank 1 left it in errors/)
    assert "injected fault" in recs["v"]["error"]["message"] and recs["v"]["error"]["rank"] == 1
    assert recs["after"]["status"] == "ok" and recs["after"]["world_size"] == 1
    assert recs["after"]["metrics"]["heldout"] is None  # synthetic tokens: no text to score
    assert proc.stdout.index("launching variant 'after'") > proc.stdout.index("launching variant 'v'")


# --- scenario errors under torchrun --------------------------------------------------------------

def _no_suite_traceback(text: str) -> bool:
    """No frame of this project's package (frames of torch under a checkout that is itself named
    `suite`, e.g. suite/.venv/..., are not ours)."""
    return "UserError" not in text and not re.search(r'File "' + re.escape(str(ROOT / "suite")) + r'[/\\]', text)


def test_bad_scenario_under_torchrun(tmp_path):
    """One error line (rank 0 only), no traceback from suite, each rank exits 2.

    torchrun itself turns any failing worker into exit code 1 and prints its own ChildFailedError
    summary (with a torchrun traceback); the workers' exit code 2 shows as the root cause there.
    """
    proc = torchrun(2, BAD, tmp_path / "out")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, explain(proc)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, explain(proc)
    assert "unknown key 'stepz'" in errors[0] and "bad.toml" in errors[0]
    assert _no_suite_traceback(text), explain(proc)
    assert re.search(r"exitcode\s*:\s*2\b", text), explain(proc)
    assert not (tmp_path / "out").exists()


def test_bad_scenario_spmd_ranks_exit_2(tmp_path):
    """The SPMD program as torchrun starts it (RANK / WORLD_SIZE set), both ranks: exit 2, rank 0 prints."""
    procs = {}
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        procs[rank] = subprocess.Popen([sys.executable, "-m", "suite", "run", str(BAD), "--out", str(tmp_path)],
                                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = {rank: p.communicate(timeout=TIMEOUT) for rank, p in procs.items()}
    assert procs[0].returncode == 2 and procs[1].returncode == 2, outs
    out0, err0 = outs[0]
    assert out0 == "" and err0.count("error:") == 1 and err0.startswith("error: ")
    assert _no_suite_traceback(err0) and "Traceback" not in err0
    assert outs[1] == ("", "")


def test_gpu_processes_cap_torch_host_threads(monkeypatch):
    """Host threads of a GPU process: cores per local process, at most 8; an explicit OMP_NUM_THREADS wins."""

    import torch

    from suite.launch import spmd

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for local_world, expected in (("1", 8), ("16", 4), ("128", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        spmd._cap_host_threads()
        assert calls.pop() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    spmd._cap_host_threads()
    assert calls == []


# --- the launcher's handoff: ranks run the variants resolved once (suite.launch.handoff) ---------------

def test_handoff_round_trips_every_shipped_scenario(tmp_path):
    """Rebuilt from the file, every shipped variant resolves and hashes as the loader made it."""
    from suite.launch import handoff

    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        variants = load_scenario(path)
        back = handoff.read(handoff.write(variants, tmp_path, path.stem))
        assert [(v.name, v.is_baseline, v.file, v.world_size(4)) for v in back] == \
            [(v.name, v.is_baseline, v.file, v.world_size(4)) for v in variants], path
        assert [v.resolved() for v in back] == [v.resolved() for v in variants], path
        assert [config_hash(v.resolved()) for v in back] == [config_hash(v.resolved()) for v in variants]


def test_ranks_read_the_handed_file_not_the_toml(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from suite.errors import UserError
    from suite.launch import handoff

    path = handoff.write(load_scenario(EQUIV, ["workload.steps=3"]), tmp_path, "x")
    args = SimpleNamespace(scenario=str(EQUIV), overrides=[], variants=["tp2"])
    monkeypatch.setenv(handoff.ENV, str(path))
    (v,) = handoff.variants_for(args)
    assert (v.name, v.workload.steps) == ("tp2", 3)  # the TOML says 8: the launcher's --set reached the rank
    with pytest.raises(UserError, match="no variant 'nope'"):
        handoff.variants_for(SimpleNamespace(scenario=str(EQUIV), overrides=[], variants=["nope"]))
    monkeypatch.delenv(handoff.ENV)
    assert handoff.variants_for(args)[0].workload.steps == 8


def test_training_runs_with_python_gc_between_steps_and_restores_it():
    import gc

    from suite.workloads import train

    assert gc.isenabled()
    with train.collections_between_steps() as collect:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        junk = []
        junk.append(junk)  # a reference cycle: only the cyclic collector frees it
        del junk
        before = gc.get_count()[0] + gc.get_count()[1]
        collect(train.GC_EVERY - 1)  # a collection step
        assert gc.get_count()[0] + gc.get_count()[1] <= before
    assert gc.isenabled() and gc.get_freeze_count() == 0
    try:
        with train.collections_between_steps():
            raise RuntimeError("a failing step")
    except RuntimeError:
        pass
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_deterministic_mode_is_scoped_to_its_variant(monkeypatch):
    """``[workload] deterministic``: deterministic algorithms (warn-only), cuDNN without autotuning and the
    cuBLAS workspace setting inside the variant; torch's defaults again after it, also after an error."""
    import torch

    from suite.launch.spmd import deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    benchmark = torch.backends.cudnn.benchmark
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark == benchmark
    with pytest.raises(RuntimeError), deterministic(True):
        raise RuntimeError("a failing variant")
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_variant_runs_and_repeats_its_losses(tmp_path):
    """A variant in deterministic mode trains, records the setting in its config, and two runs give the
    same loss curve (on CPU they would anyway: this checks the mode breaks nothing on the way)."""
    from check_worker import run_suite

    scenario = tmp_path / "s.toml"
    scenario.write_text('name = "det"\n[model]\npreset = "tiny"\n[workload]\nsteps = 4\nglobal_batch = 2\n'
                        'micro_batch = 2\nseq_length = 32\ndeterministic = true\n')
    curves = []
    for run in ("a", "b"):
        r = run_suite("run", scenario, "--out", tmp_path / run, timeout_s=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        (rec,) = [json.loads(line) for line in (tmp_path / run / "records.jsonl").read_text().splitlines()]
        assert rec["status"] == "ok" and rec["config"]["workload"]["deterministic"] is True
        curves.append(rec["metrics"]["loss_curve"])
    assert curves[0] == curves[1]
