"""Distributed checkpoints (suite.models.checkpoint): save at one TP/PP layout, load at another.

* ``test_reshard_round_trip``: one ``torchrun --nproc-per-node 2`` of this file's ``worker``: a random
  tiny model saved at TP=1 (x DP=2) loads at TP=2, at PP=2 and at PP=2 x VPP=2 (the interleaved
  schedule), is saved again from PP=2 and loads back at TP=1; every load gives the saved model's
  log-probs (fp32; measured: TP=2 within 2e-6, PP=2 and TP=1 bit-identical; asserted 1e-5);
* ``test_runner_saves_and_loads``: the runner end to end: ``[workload] save_checkpoint`` after training,
  ``[model] init = "checkpoint:..."`` (relative to the scenario file) at TP=2 and PP=2, and the user
  errors for a shape mismatch and a missing checkpoint, recorded as failed variants.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300
TOL = 1e-5

SCENARIO = """
name = "checkpoint"
[model]
preset = "tiny"
[workload]
seq_length = 32
global_batch = 4
micro_batch = 2
"""

# (name, tp, pp, overrides, save afterwards)
STEPS = [
    ("tp1", 1, 1, ['workload.save_checkpoint="ck_tp1"'], True),
    ("tp2", 2, 1, ['model.init="checkpoint:ck_tp1"', "workload.seed=99"], False),
    ("pp2", 1, 2, ['model.init="checkpoint:ck_tp1"', "workload.seed=99", 'workload.save_checkpoint="ck_pp2"'], True),
    ("back_to_tp1", 1, 1, ['model.init="checkpoint:ck_pp2"', "workload.seed=99"], False),
    # interleaved schedule: 2 chunks a rank, and the evaluator splits its rows into pp micro-batches
    ("pp2_vpp2", 1, 2, ['model.init="checkpoint:ck_tp1"', "workload.seed=99", "parallel.vpp=2"], False),
    ("other_seed", 1, 1, ["workload.seed=99"], False),  # what the loads start from before loading
]


def worker(scenario: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from suite.eval.megatron_lm import build
    from suite.launch import cpu_compat
    from suite.models import checkpoint
    from suite.scenario import load_scenario

    cpu_compat.enable()
    dist.init_process_group("gloo")
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    results, logs = {}, []
    for name, tp, pp, overrides, save in STEPS:
        (spec,) = load_scenario(scenario, [f"parallel.tp={tp}", f"parallel.pp={pp}", *overrides])
        ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=spec.parallel.vpp)
        lm = build(spec, log=logs.append)
        results[name] = lm(tokens)
        if save:
            checkpoint.save(spec, lm.chunks, log=logs.append)
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        torch.save({"logprobs": results, "log": logs}, out)
    dist.destroy_process_group()


def _env() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUITE_INJECT_FAULT"):
        env.pop(key, None)
    return env


def _torchrun(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == expect, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_reshard_round_trip(tmp_path):
    (tmp_path / "scenario.toml").write_text(SCENARIO)
    _torchrun(str(Path(__file__)), "worker", str(tmp_path / "scenario.toml"), str(tmp_path / "out.pt"))
    out = torch.load(tmp_path / "out.pt")
    lp = out["logprobs"]
    ref = lp["tp1"]
    assert ref.shape == (2, 32, 256)
    for name in ("tp2", "pp2", "back_to_tp1", "pp2_vpp2"):
        assert (lp[name] - ref).abs().max() < TOL, name
    assert (lp["other_seed"] - ref).abs().max() > 0.01, "the loads must have replaced other weights"
    assert (tmp_path / "ck_tp1" / "metadata.json").is_file() and (tmp_path / "ck_pp2" / "common.pt").is_file()
    assert f"checkpoint saved to {tmp_path / 'ck_tp1'}" in out["log"]


RUNNER_SCENARIO = """
name = "checkpoint_runner"
[model]
preset = "tiny"
[workload]
steps = 4
warmup_steps = 1
global_batch = 4
micro_batch = 2
seq_length = 32
lr = 3e-3
min_lr = 3e-4
log_interval = 4
eval_batches = 2
[data]
source = "text"
path = "builtin:shakespeare"

[variants.train.workload]
save_checkpoint = "ckpt"

# lr 1e-12: the loaded model barely moves, so its validation loss is the saved model's
[variants.tp2.model]
init = "checkpoint:ckpt"
[variants.tp2.parallel]
tp = 2
[variants.tp2.workload]
steps = 2
lr = 1e-12
min_lr = 0.0

[variants.pp2.model]
init = "checkpoint:ckpt"
[variants.pp2.parallel]
pp = 2
[variants.pp2.workload]
steps = 2
lr = 1e-12
min_lr = 0.0

[variants.wrong_shape.model]
init = "checkpoint:ckpt"
ffn_hidden_size = 256

[variants.missing.model]
init = "checkpoint:nowhere"
"""


@pytest.mark.slow
def test_runner_saves_and_loads(tmp_path):
    (tmp_path / "s.toml").write_text(RUNNER_SCENARIO)
    # two variants fail by design (wrong_shape, missing): the run records them, goes on, and exits 1
    _torchrun("-m", "suite", "run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "results"), expect=1)
    lines = (tmp_path / "results" / "records.jsonl").read_text().splitlines()
    recs = {r["variant"]: r for r in map(json.loads, lines)}
    assert recs["train"]["status"] == "ok" and (tmp_path / "ckpt" / "metadata.json").is_file()
    saved = recs["train"]["metrics"]["validation_loss"]
    for name in ("tp2", "pp2"):
        assert recs[name]["status"] == "ok", recs[name].get("error")
        assert recs[name]["metrics"]["validation_loss"] == pytest.approx(saved, rel=1e-5), name
    wrong = recs["wrong_shape"]["error"]["message"]
    assert "key 'model.ffn_hidden_size'" in wrong and "ffn_hidden_size = 192" in wrong, wrong
    missing = recs["missing"]["error"]["message"]
    assert "key 'model.init'" in missing and "no checkpoint at" in missing and "nowhere" in missing, missing


# --- no processes: the checks before any collective ---------------------------------------------------

def _spec(tmp_path, text: str = SCENARIO):
    from suite.scenario import load_scenario

    (tmp_path / "s.toml").write_text(text)
    return load_scenario(tmp_path / "s.toml")[0]


def test_shape_check_names_the_key(tmp_path):
    from suite.errors import UserError
    from suite.models import checkpoint

    spec = _spec(tmp_path)
    saved = {**checkpoint.model_shape(spec), "num_query_groups": 4, "vocab_size": 512}
    with pytest.raises(UserError) as e:
        checkpoint.check_shape(spec, saved, tmp_path / "ck")
    assert e.value.key == "model.num_query_groups"
    assert e.value.fix == "set in [model]: num_query_groups = 4, vocab_size = 512."
    checkpoint.check_shape(spec, checkpoint.model_shape(spec), tmp_path / "ck")  # equal: no error


def test_paths_are_relative_to_the_scenario_and_never_clobber_other_files(tmp_path):
    from suite.errors import UserError
    from suite.models import checkpoint

    spec = _spec(tmp_path, SCENARIO + 'save_checkpoint = "out/ck"\n')
    assert checkpoint.check_save_path(spec) == tmp_path / "out" / "ck"
    assert checkpoint.resolve(spec, "/abs/ck") == Path("/abs/ck")
    (tmp_path / "out" / "ck").mkdir(parents=True)
    assert checkpoint.check_save_path(spec) == tmp_path / "out" / "ck"  # empty: fine
    (tmp_path / "out" / "ck" / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as e:
        checkpoint.check_save_path(spec)
    assert e.value.key == "workload.save_checkpoint"
    with pytest.raises(UserError, match="no checkpoint at") as e:
        checkpoint.load(spec, [], tmp_path / "out" / "ck")
    assert e.value.key == "model.init"


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
