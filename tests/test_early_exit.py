"""Early-exit training (suite.tricks.early_exit): validation, FLOPs, and one real run of
tests/scenarios/early_exit/exit.toml (the tiny model, an exit after its first layer, fp32 on CPU):

* weight 0 measures the exit without training it: every loss of the run is the baseline's, bit for bit;
* weight 1 trains it: the exit's validation loss falls well below the untrained exit's;
* the same variant over 2 tensor-parallel processes gives the same losses (vocab-parallel head and loss);
* the records' FLOPs a step are the model's plus the exit's LM head, forward and backward;
* the exit's validation loss is a declared measure, which `suite compare` gates like the model's own.
"""
from __future__ import annotations

import json

import pytest
from check_worker import ROOT, run_suite

from suite.errors import UserError
from suite.report import gate
from suite.metrics import flops as F
from suite.scenario import load_scenario
from suite.tricks.early_exit import step_flops

EXIT = ROOT / "tests" / "scenarios" / "early_exit" / "exit.toml"


def test_step_flops_add_the_exit_head_forward_and_backward():
    shape = F.Shape(layers=4, hidden=64, heads=4, groups=2, ffn=192, vocab=256)
    assert step_flops(shape, 8, 128) - F.train_step_flops(shape, 8, 128) == 3 * 2 * 8 * 128 * 64 * 256


@pytest.mark.parametrize("overrides, key, words", [
    (["tricks.early_exit.weight=1"], "tricks.early_exit.layer", "layer is required"),
    (["tricks.early_exit.layer=4"], "tricks.early_exit.layer", "below the model's 4 layers"),
    (["tricks.early_exit.layer=1", "parallel.pp=2"], "parallel.pp", "different stages"),
    (["tricks.early_exit.layer=1", 'parallel.recompute="full"'], "parallel.recompute", "without autograd"),
    (["tricks.early_exit.layer=1", "tricks.random_ltd.min_kept=32"], "tricks", "random_ltd"),
    (["tricks.early_exit.layer=1", "tricks.stacking.growth=2", "tricks.stacking.steps=[20,20]"], "tricks",
     "stacking runs its own workload loop"),
    (["tricks.early_exit.layer=1", "tricks.early_exit.weight=-1"], "tricks.early_exit.weight", "weight"),
])
def test_refused_with_the_key_and_a_fix(overrides, key, words):
    with pytest.raises(UserError) as e:
        load_scenario(EXIT, overrides, only=["baseline"])
    assert e.value.key == key and words in str(e.value) and "Fix:" in str(e.value)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("early_exit")
    proc = run_suite("run", EXIT, "--out", out, timeout_s=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = {r["variant"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    assert {v: r["status"] for v, r in recs.items()} == dict.fromkeys(recs, "ok") and len(recs) == 4
    return {v: {**r["metrics"], "measures": r["measures"]} for v, r in recs.items()}


def test_weight_zero_is_the_baseline_bit_for_bit(records):
    base, measured = records["baseline"], records["measured"]
    for key in ("loss_curve", "final_loss", "validation_loss", "heldout"):
        assert measured[key] == base[key], key
    # [step, loss, walltime, FLOPs]: the walltime and FLOPs differ (the exit is computed), the loss may not
    assert [p[:2] for p in measured["validation_curve"]] == [p[:2] for p in base["validation_curve"]]
    exit_loss = measured["extra"]["early_exit"]["validation_exit_loss"]
    assert exit_loss > base["validation_loss"] + 0.1  # an untrained exit after 1 of 4 layers predicts worse


def test_training_the_exit_lowers_its_loss_on_every_layout(records):
    untrained = records["measured"]["extra"]["early_exit"]["validation_exit_loss"]
    trained = records["trained"]["extra"]["early_exit"]["validation_exit_loss"]
    assert trained < untrained - 0.1, (trained, untrained)
    tp2 = records["trained_tp2"]
    assert tp2["extra"]["early_exit"]["validation_exit_loss"] == pytest.approx(trained, abs=1e-4)
    assert tp2["validation_loss"] == pytest.approx(records["trained"]["validation_loss"], abs=1e-4)


def test_records_count_the_exit_head(records):
    [spec] = load_scenario(EXIT, only=["trained"])
    w = spec.workload
    assert records["trained"]["flops_per_step"] == step_flops(F.Shape.of(spec.model), w.global_batch, w.seq_length)
    assert records["baseline"]["flops_per_step"] == F.train_step_flops(F.Shape.of(spec.model), w.global_batch,
                                                                       w.seq_length)


def test_the_exit_loss_is_a_measure_the_gate_reads(records):
    def exit_measure(variant):
        [m] = [m for m in records[variant]["measures"] if m["name"] == "exit_validation_loss"]
        return m
    trained, measured = exit_measure("trained"), exit_measure("measured")
    assert trained["value"] == pytest.approx(records["trained"]["extra"]["early_exit"]["validation_exit_loss"])
    assert trained["point"] == {} and trained["paired"] and len(trained["samples"]) == 4  # 2 x 8 / 4
    assert not [m for m in records["baseline"]["measures"] if m["name"] == "exit_validation_loss"]
    # the untrained exit judged against the trained one: a regression of its own measure
    [row] = gate.judge_measures([measured], [trained], gate.Limits())
    assert row["kind"] == gate.REGRESSION and row["change"] > 0.1
