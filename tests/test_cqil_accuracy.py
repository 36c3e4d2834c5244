"""The accuracy workload and CQIL's recovery fine-tune (suite.workloads.accuracy, suite.parallel.cqil.finetune).

That the one-process CQIL model computes the distributed CQIL function is checked in test_cqil.py.
Here: LoRA adapters start as a no-op and switch off cleanly (worker checks, one process), and a real
``suite run`` of tests/scenarios/cqil/accuracy.toml (a tiny random model with large init, CPU)
records quality before and after the fine-tune, which must bring the CQIL model closer to the original.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from check_worker import ROOT, result, run_suite, run_worker, worker_main  # noqa: E402

SCENARIO = ROOT / "tests" / "scenarios" / "cqil" / "accuracy.toml"


# --- worker checks (one process) ------------------------------------------------------------------

def _model_and_tokens(variant: str):
    import torch

    from suite.models import gpt
    from suite.scenario import load_scenario

    (spec,) = load_scenario(SCENARIO, only=[variant])
    (model,) = gpt.build_chunks(spec, gpt.transformer_config(spec))
    gpt.init_parameters([model], spec.workload.seed, spec.model.init_std, spec.model.num_layers)
    model.eval()
    tokens = torch.randint(0, spec.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return spec, model, tokens


def check_lora_starts_as_a_no_op_and_switches_off(tmp):
    import torch

    from suite.parallel.cqil import plan_of
    from suite.parallel.cqil.finetune import LoRA, concurrent_logits

    spec, model, tokens = _model_and_tokens("cqil2")
    plan = plan_of(spec)
    with torch.no_grad():
        before = concurrent_logits(model, tokens, plan)
        lora = LoRA(model, rank=4, alpha=8)
        at_start = concurrent_logits(model, tokens, plan)
        for up in lora.up:
            up.normal_(std=0.05)
        adapted = concurrent_logits(model, tokens, plan)
        lora.enabled = False
        off = concurrent_logits(model, tokens, plan)
        lora.remove()
        removed = concurrent_logits(model, tokens, plan)
    return {"adapters": len(lora.up), "layers": spec.model.num_layers,
            "frozen": not any(p.requires_grad for p in model.parameters()),
            "trainable": sum(p.numel() for p in lora.parameters()),
            "start_equal": torch.equal(before, at_start), "off_equal": torch.equal(before, off),
            "removed_equal": torch.equal(before, removed), "adapted_diff": float((adapted - before).abs().max())}


CHECKS = [check_lora_starts_as_a_no_op_and_switches_off]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return run_worker(__file__, tmp_path_factory.mktemp("cqil_accuracy"))


def test_lora_starts_as_a_no_op_and_switches_off(worker):
    r = result(worker, "lora_starts_as_a_no_op_and_switches_off")
    assert r["adapters"] == 4 * r["layers"]  # QKV, attention output, MLP in and out of every layer
    # h = 64, QKV out 64 + 2·2·16 = 128, MLP in 2·192 (SwiGLU), out 64; rank 4: r·(in + out) each
    assert r["trainable"] == r["layers"] * 4 * ((64 + 128) + (64 + 64) + (64 + 384) + (192 + 64))
    assert r["frozen"] and r["start_equal"] and r["off_equal"] and r["removed_equal"]
    assert r["adapted_diff"] > 1e-3


# --- a real run -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy_run")
    r = run_suite("run", SCENARIO, "--out", out, timeout_s=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return {rec["variant"]: rec for rec in recs}, out


@pytest.mark.slow
def test_records_hold_quality_before_and_after_the_fine_tune(records):
    recs, _ = records
    assert {v: r["status"] for v, r in recs.items()} == {"original": "ok", "cqil2": "ok", "cqil2_bypass": "ok"}
    acc = {v: r["metrics"]["accuracy"] for v, r in recs.items()}
    assert set(acc["original"]) == {"original", "walltime_s"}  # no CQIL: the checkpoint's evaluation only
    for v in ("original", "cqil2", "cqil2_bypass"):
        o = acc[v]["original"]
        assert o == acc["original"]["original"]  # the same model on the same tokens in every variant
        assert o["tokens"] == 512 and math.isclose(o["perplexity"], math.exp(o["loss"]), rel_tol=1e-12)
        assert math.isclose(o["bpb"], o["loss"] / math.log(2), rel_tol=1e-9)  # byte tokenizer
    for v in ("cqil2", "cqil2_bypass"):
        a = acc[v]
        assert a["concurrent"]["loss"] != a["original"]["loss"]  # CQIL changes the function
        assert a["finetune"]["steps"] == 30 and a["finetune"]["tokens"] == 30 * 4 * 64
        assert a["finetune"]["kl_last"] < a["finetune"]["kl_first"]
        # the fine-tune brings the CQIL model's held-out predictions closer to the original's
        assert a["finetuned"]["kl_to_original"] < 0.9 * a["concurrent"]["kl_to_original"]
        assert recs[v]["metrics"]["cqil"]["depth"] == 4  # 6 layers, two groups of 2
    assert acc["cqil2"]["concurrent"]["loss"] != acc["cqil2_bypass"]["concurrent"]["loss"]


@pytest.mark.slow
def test_multiple_choice_tasks_are_scored_for_every_model(records):
    """[eval] tasks: acc and acc_norm of tests/data/eval/tiny_mc.jsonl (4 examples) for each model measured,
    the same for the same model in every variant (the scorer itself is checked by hand in test_eval.py)."""
    recs, _ = records
    acc = {v: r["metrics"]["accuracy"] for v, r in recs.items()}
    blocks = [acc["original"]["original"]] + [acc[v][p] for v in ("cqil2", "cqil2_bypass")
                                               for p in ("original", "concurrent", "finetuned")]
    for block in blocks:
        t = block["tasks"]["tiny_mc"]
        assert t["n"] == 4 and t["acc"] in {i / 4 for i in range(5)} and t["acc_norm"] in {i / 4 for i in range(5)}
        assert set(t) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}  # no per-example lists
    assert all(acc[v]["original"]["tasks"] == acc["original"]["original"]["tasks"] for v in acc)


@pytest.mark.slow
def test_report_renders_the_accuracy_table(records):
    _, out = records
    r = run_suite("report", out)
    assert r.returncode == 0, r.stderr
    assert "### Accuracy" in r.stdout and "ppl after fine-tune" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("| cqil2 |"))
    assert "degree 2, bypass 0, depth 4/6" in row and "33.3%" in row and "30 steps × 4 × 64, LoRA r4" in row
    assert "#### Zero-shot multiple choice" in r.stdout
    assert any(line.startswith("| cqil2 | CQIL after fine-tune | tiny_mc | ") for line in r.stdout.splitlines())


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3]))


@pytest.mark.slow
def test_the_fine_tuned_model_is_saved_with_its_adapters_merged(tmp_path):
    """[workload] save_checkpoint with a fine-tune saves the recovered weights (LoRA folded into the
    projections): loaded again under the same CQIL groups without a fine-tune, the model scores what the
    fine-tuned one did; without a fine-tune there is nothing new to save, and validate says so."""
    model = "\n".join(SCENARIO.read_text().split("[model]")[1].split("[workload]")[0].strip().splitlines())
    common = (f'[workload]\nkind = "accuracy"\nseq_length = 64\nprecision = "fp32"\n'
              f'[eval]\nheldout_max_tokens = 512\n[data]\nsource = "text"\npath = "builtin:shakespeare"\n')
    cqil = "[variants.cqil2.parallel.cqil]\nstart = 1\nend = 5\ndegree = 2\n"
    tune = 'finetune = { steps = 20, rank = 4, alpha = 8, lr = 3e-3, batch = 4 }\n'
    (tmp_path / "tune.toml").write_text(f'name = "tune"\n[model]\n{model}\n{common}'
                                        f'[variants.cqil2.workload]\nsave_checkpoint = "saved"\n{cqil}{tune}')
    (tmp_path / "load.toml").write_text(f'name = "load"\n[model]\n{model}\ninit = "checkpoint:saved"\n{common}{cqil}')
    (tmp_path / "bad.toml").write_text(f'name = "bad"\n[model]\n{model}\n{common}'
                                       f'[variants.cqil2.workload]\nsave_checkpoint = "x"\n{cqil}')
    runs = {}
    for name in ("tune", "load"):
        r = run_suite("run", tmp_path / f"{name}.toml", "--out", tmp_path / name, timeout_s=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        [rec] = [json.loads(line) for line in (tmp_path / name / "records.jsonl").read_text().splitlines()]
        runs[name] = rec["metrics"]["accuracy"]
    tuned, loaded = runs["tune"]["finetuned"], runs["load"]["concurrent"]
    assert loaded["tokens"] == tuned["tokens"]
    assert math.isclose(loaded["loss"], tuned["loss"], rel_tol=1e-5)
    assert not math.isclose(runs["load"]["original"]["loss"], runs["tune"]["original"]["loss"], rel_tol=1e-5)
    r = run_suite("validate", tmp_path / "bad.toml")
    assert r.returncode == 2 and "key 'workload.save_checkpoint'" in r.stderr and "add finetune" in r.stderr
