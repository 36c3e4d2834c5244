"""CQIL: the configuration, the distributed forward against the group formula, and the similarity analysis.

Slow tests run real processes on ``tests/scenarios/cqil/equivalence.toml`` (an 8-layer GQA model):

* one process (this file as a script, ``reference``): the unmodified model's logits, and the group
  formula applied layer by layer to the unmodified model's layers by
  ``suite.parallel.cqil.finetune.concurrent_logits`` (the accuracy workload's CQIL model; it shares no
  code with the distributed ``suite.parallel.cqil.layer``):  per group with input h,
  a_j = attn_j(norm(h)), m_j = h + a_j + Σ_{i=1..min(d,k)} a_{j−i},  out_j = m_j + mlp_j(norm(m_j)),
  h ← h + Σ_j (out_j − h); and the degree-1 CQIL model, which must equal the unmodified model bit for bit;
* two processes (``tests/test_inference.py``'s worker): cqil2 (bypass 0), cqil2_bypass (bypass 1)
  and groups_gap (explicit groups with a plain layer between them);
* four processes: tp2_cqil2 (TP 2 inside each CQIL rank, bypass 1) and cqil4 (one group of 4,
  bypass 2).

Each distributed run's full-sequence logits must match the formula to 1e-5 absolute (fp32 logits of
magnitude ~1; the observed difference is ~1e-7, from reduction order under TP), and its KV-cache decode
must match its own full forward to the same tolerance.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test_inference: the worker and its helpers
from check_worker import run_suite  # noqa: E402
from test_inference import (ATOL, PROMPT, ROOT, TIMEOUT, fixed_tokens, init_worker,  # noqa: E402
                            max_diff, run_worker, teacher_forced_logits)

from suite.errors import UserError  # noqa: E402
from suite.parallel.cqil import CQILConfig, CQILPlan, degree_of, plan_of  # noqa: E402
from suite.scenario import load_scenario  # noqa: E402

EQUIV = ROOT / "tests" / "scenarios" / "cqil" / "equivalence.toml"
INFERENCE_WORKER = Path(__file__).parent / "test_inference.py"


# --- worker: the single-process reference ---------------------------------------------------------

def reference_worker(out: str, scenario: str, degree_one: str, variants: list[str]) -> None:
    """Unmodified logits, formula logits per CQIL variant, and the degree-1 CQIL model's logits."""
    import dataclasses

    import torch
    from megatron.core import parallel_state as ps

    from suite.models import checkpoint, gpt
    from suite.parallel.cqil.finetune import concurrent_logits
    from suite.scenario.schema import ParallelConfig
    from suite.models.generate import Engine
    from test_inference import full_logits

    init_worker()
    ps.initialize_model_parallel()
    specs = {v.name: v for v in load_scenario(scenario)}
    base = dataclasses.replace(specs[degree_one], parallel=ParallelConfig())
    (model,) = gpt.build_chunks(base, gpt.transformer_config(base))
    gpt.init_parameters([model], base.workload.seed, base.model.init_std, base.model.num_layers)
    model.eval()
    tokens = fixed_tokens(base.model.vocab_size)
    vocab = base.model.vocab_size
    results = {}
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        results["plain"] = model(tokens, positions, None)[..., :vocab]
        for name in variants:
            results[name] = concurrent_logits(model, tokens, plan_of(specs[name]))[..., :vocab]
    engine = Engine(specs[degree_one])
    results["degree1"] = {"full": full_logits(engine, tokens), "decode": teacher_forced_logits(engine, tokens, PROMPT)}
    engine.close()
    # other weights, saved as a checkpoint that CQIL ranks load (each building a subset of the layers)
    (other,) = gpt.build_chunks(base, gpt.transformer_config(base))
    gpt.init_parameters([other], 99, base.model.init_std, base.model.num_layers)
    other.eval()
    saving = dataclasses.replace(base, workload=dataclasses.replace(base.workload,
                                                                    save_checkpoint=str(Path(out) / "ckpt")))
    checkpoint.save(saving, [other], log=lambda message: None)
    with torch.no_grad():
        results["ckpt:cqil2_bypass"] = concurrent_logits(other, tokens, plan_of(specs["cqil2_bypass"]))[..., :vocab]
    torch.save(results, Path(out) / "rank0.pt")


# --- fast: configuration --------------------------------------------------------------------------

def variant(tmp_path, cqil: str, extra: str = ""):
    path = tmp_path / "s.toml"
    path.write_text(f'[model]\npreset = "llama-7b"\n[workload]\nkind = "inference"\n{extra}\n'
                    f"[parallel]\ncqil = {cqil}\n")
    (v,) = load_scenario(path)
    return v


def test_compact_form_is_the_papers_groups(tmp_path):
    p2 = plan_of(variant(tmp_path, "{ start = 12, end = 30, degree = 2 }"))
    assert p2.groups == tuple((a, a + 1) for a in range(12, 30, 2)) and p2.bypass == 0
    p4 = plan_of(variant(tmp_path, "{ start = 14, end = 30, degree = 4, bypass = 1 }"))
    assert p4.groups == ((14, 15, 16, 17), (18, 19, 20, 21), (22, 23, 24, 25), (26, 27, 28, 29))
    assert (p2.depth, p4.depth) == (32 - 9, 32 - 12)  # the paper's ideal cuts: 9/32 and 12/32
    explicit = plan_of(variant(tmp_path, "{ groups = [[14, 15, 16, 17], [18, 19, 20, 21], [22, 23, 24, 25], "
                                         "[26, 27, 28, 29]], bypass = 1 }"))
    assert explicit == p4


def test_each_cqil_rank_builds_one_layer_per_group_and_every_plain_layer():
    plan = CQILPlan(groups=((2, 3), (4, 5)), bypass=0, num_layers=8)
    assert plan.layers_on(0) == [(0, None), (1, None), (2, 0), (4, 0), (6, None), (7, None)]
    assert plan.layers_on(1) == [(0, None), (1, None), (3, 1), (5, 1), (6, None), (7, None)]
    assert plan.describe() == {"degree": 2, "groups": [[2, 3], [4, 5]], "bypass": 0, "depth": 6,
                               "layers_per_gpu": 6}


def test_world_is_tp_times_degree(tmp_path):
    assert variant(tmp_path, "{ start = 12, end = 30, degree = 2 }").world_size() == 2
    assert variant(tmp_path, "{ start = 14, end = 30, degree = 4 }", "").world_size() == 4
    v = variant(tmp_path, "{ groups = [[12, 13]] }")
    v.parallel.tp = 2
    assert v.world_size() == 4
    assert degree_of(None) == 1 and degree_of(CQILConfig(groups=[[1, 2, 3]])) == 3


def test_cqil_errors_name_the_key(tmp_path):
    with pytest.raises(UserError) as e:
        variant(tmp_path, "{ start = 12, end = 30, degree = 4 }")
    assert e.value.key == "parallel.cqil.end" and "set end = 28" in e.value.fix


# --- fast: suggested grouping ---------------------------------------------------------------------

def test_suggested_groups_hold_the_threshold_against_the_first_layer():
    from suite.parallel.cqil.similarity import suggest_groups

    sim = [[1.0, 0.99, 0.90, 0.80, 0.70],
           [0.99, 1.0, 0.97, 0.96, 0.80],
           [0.90, 0.97, 1.0, 0.98, 0.95],
           [0.80, 0.96, 0.98, 1.0, 0.97],
           [0.70, 0.80, 0.95, 0.97, 1.0]]
    assert suggest_groups(sim, 0.95, 2) == [[0, 1], [2, 3]]
    assert suggest_groups(sim, 0.95, 3) == [[1, 2, 3]]  # [0,1,2] fails: cos(x0, x2) = 0.90
    assert suggest_groups(sim, 0.999, 2) == []


# --- slow: the distributed forward ----------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cqil")
    two_way = ["cqil2", "cqil2_bypass", "groups_gap"]
    four_way = ["tp2_cqil2", "cqil4"]
    (ref,) = run_worker(Path(__file__), base / "ref", 1, EQUIV, "degree1", *two_way, *four_way)
    two = run_worker(INFERENCE_WORKER, base / "two", 2, EQUIV, *two_way)
    four = run_worker(INFERENCE_WORKER, base / "four", 4, EQUIV, *four_way)
    loading = base / "from_checkpoint.toml"
    loading.write_text(f'extends = "{EQUIV}"\n[model]\ninit = "checkpoint:{base / "ref" / "ckpt"}"\n')
    (ckpt, _) = run_worker(INFERENCE_WORKER, base / "ckpt", 2, loading, "cqil2_bypass")
    return {"ref": ref, "dist": {**two[0], **four[0]}, "ckpt": ckpt}


@pytest.mark.slow
def test_degree_one_is_the_unmodified_model_exactly(runs):
    import torch

    ref = runs["ref"]
    assert torch.equal(ref["degree1"]["full"], ref["plain"])
    assert max_diff(ref["degree1"]["decode"], ref["plain"][:, PROMPT - 1:]) < ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cqil2", "cqil2_bypass", "groups_gap", "tp2_cqil2", "cqil4"])
def test_distributed_cqil_matches_the_group_formula(runs, name):
    ref, got = runs["ref"], runs["dist"][name]
    assert max_diff(got["full"], ref[name]) < ATOL
    assert max_diff(got["decode"], got["full"][:, PROMPT - 1:]) < ATOL  # KV cache under CQIL
    # CQIL changes the function (else the comparison above would prove nothing)
    assert max_diff(ref[name], ref["plain"]) > 100 * ATOL


@pytest.mark.slow
def test_cqil_ranks_load_a_checkpoint_of_the_full_model(runs):
    """A checkpoint saved by the unmodified model loads into CQIL ranks, which build a subset of its layers."""
    got, ref = runs["ckpt"]["cqil2_bypass"]["full"], runs["ref"]
    assert max_diff(got, ref["ckpt:cqil2_bypass"]) < ATOL
    assert max_diff(got, ref["cqil2_bypass"]) > 100 * ATOL  # the checkpoint's weights, not the seed's


@pytest.mark.slow
def test_bypass_changes_the_function(runs):
    assert max_diff(runs["ref"]["cqil2"], runs["ref"]["cqil2_bypass"]) > 100 * ATOL


# --- slow: suite analyze similarity ---------------------------------------------------------------

@pytest.mark.slow
def test_analyze_similarity_writes_table_heatmap_and_groups(tmp_path):
    scenario = ROOT / "scenarios" / "cqil_tiny.toml"
    r = run_suite("analyze", "similarity", scenario, "--threshold", "0.5", "--batches", "1", "-o", tmp_path,
                  timeout_s=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads((tmp_path / "similarity.json").read_text())
    sim = data["matrix"]
    assert len(sim) == 8 and all(abs(sim[i][i] - 1) < 1e-5 for i in range(8))
    assert all(abs(sim[i][j] - sim[j][i]) < 1e-9 for i in range(8) for j in range(8))
    assert data["suggested_groups"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # every pair clears 0.5
    text = (tmp_path / "similarity.md").read_text()
    assert "| 0 | " in text and "cqil = { groups = [[0, 1], [2, 3], [4, 5], [6, 7]], bypass = 0 }" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
    else:
        assert (tmp_path / "similarity.png").read_bytes()[:4] == b"\x89PNG"


if __name__ == "__main__":
    reference_worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
