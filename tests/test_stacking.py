"""Depth stacking (suite.tricks.stacking): the growth operator, what the growth preserves on a real
megatron-core model, per-phase FLOPs, and the two phases through `torchrun -m suite run` (2 processes: DP,
TP and PP grow and train the same function).

The growth does not preserve the shallow model's function; what it preserves exactly is tested: every
grown parameter is a copy (layer i + j·n = shallow layer i, embeddings and head unchanged), so the grown
decoder computes the shallow layer stack applied g times in a row. Megatron-core checks run in one worker
subprocess (``python THIS_FILE --worker``, see ``check_worker``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from check_worker import result, run_worker, torchrun, worker_main

from suite.errors import UserError
from suite.metrics import flops as F
from suite.tricks.stacking import phase_flops, phase_models
from suite.tricks.stacking.operators import stack

ROOT = Path(__file__).resolve().parents[1]
GROW = ROOT / "tests" / "scenarios" / "stacking" / "grow.toml"


def _spec(variant="stacking", *overrides):
    from suite.scenario import load_scenario

    (v,) = load_scenario(GROW, list(overrides), only=[variant])
    return v


class _T:  # a stand-in tensor: stack only renames and clones
    def __init__(self, tag):
        self.tag = tag

    def clone(self):
        return _T(self.tag)


def test_stack_repeats_the_whole_layer_stack():
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    state = {n: _T(n) for n in names}
    for i in range(3):
        for part in ("self_attention.linear_qkv.weight", "mlp.linear_fc2.weight"):
            state[f"decoder.layers.{i}.{part}"] = _T((i, part))
    grown = stack(state, 2)
    assert len(grown) == 3 + 2 * 6
    for i in range(6):  # G_stack order: [l0 l1 l2 l0 l1 l2], not [l0 l0 l1 l1 l2 l2]
        assert grown[f"decoder.layers.{i}.mlp.linear_fc2.weight"].tag == (i % 3, "mlp.linear_fc2.weight")
        copy, source = f"decoder.layers.{i}.mlp.linear_fc2.weight", f"decoder.layers.{i % 3}.mlp.linear_fc2.weight"
        assert grown[copy] is not state[source]
    for n in names:
        assert grown[n] is state[n]
    with pytest.raises(ValueError):
        stack({"decoder.layers.1.x": _T(0)}, 2)


def test_phase_shapes_and_flops():
    spec = _spec()
    cfg = spec.tricks["stacking"]
    shallow, grown = phase_models(spec.model, cfg)
    assert (shallow.num_layers, grown.num_layers) == (2, 4) and shallow.hidden_size == grown.hidden_size == 64
    B, S = spec.workload.global_batch, spec.workload.seq_length
    assert phase_flops(spec, cfg) == [3 * F.train_step_flops(F.Shape.of(shallow), B, S),
                                      4 * F.train_step_flops(F.Shape.of(spec.model), B, S)]


def test_validation_refuses_bad_settings():
    for override, key in [("tricks.stacking.growth=3", "tricks.stacking.growth"),
                          ("tricks.stacking.steps=[3]", "tricks.stacking.steps"),
                          ("tricks.stacking.steps=[1, 4]", "tricks.stacking.steps"),
                          ("tricks.stacking.lr=[1e-3]", "tricks.stacking.lr"),
                          ('model.init="checkpoint:x"', "model.init")]:
        with pytest.raises(UserError) as e:
            _spec("stacking", override)
        assert e.value.key == key and "stacking" in str(e.value), override


# --- the single-process worker --------------------------------------------------------------------

def check_growth_copies_and_composes_the_shallow_stack(tmp):
    """Shallow (2 layers) -> gather -> stack -> load into a 4-layer model: parameters are copies, and the
    grown decoder's output is the shallow layers applied twice then the shallow final norm."""
    import dataclasses

    import torch

    from suite.data.tokens import TokenSource
    from suite.models import gpt
    from suite.models.build import build
    from suite.tricks.multilevel.state import full_state, load_state
    from suite.tricks.stacking import phase_spec

    spec = _spec()
    cfg = spec.tricks["stacking"]
    shallow_spec, grown_spec = phase_spec(spec, cfg, 0), phase_spec(spec, cfg, 1)
    grown_spec = dataclasses.replace(grown_spec, workload=dataclasses.replace(grown_spec.workload, seed=7))
    (shallow,) = build(shallow_spec, gpt.layer_spec(), log=lambda *a: None).chunks
    (grown,) = build(grown_spec, gpt.layer_spec(), log=lambda *a: None).chunks
    small = full_state([shallow])
    load_state([grown], stack(small, cfg.growth))
    big = full_state([grown])
    copies = all(torch.equal(big[f"decoder.layers.{i + 2 * j}.{rest}"], small[f"decoder.layers.{i}.{rest}"])
                 for name in small if name.startswith("decoder.layers.")
                 for i, rest in [(int(name.split(".")[2]), name.split(".", 3)[3])] for j in range(2))
    outside = [n for n in small if not n.startswith("decoder.layers.")]
    unchanged = all(torch.equal(big[n], small[n]) for n in outside)

    batch = TokenSource(spec).train_batch(0, 2)
    tokens = batch[:, :-1].contiguous()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    seen = {}
    grown.decoder.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=kw["hidden_states"], kw={k: v for k, v in kw.items() if k != "hidden_states"}),
        with_kwargs=True)
    grown.decoder.register_forward_hook(lambda m, a, out: seen.update(out=out))
    shallow.eval()
    grown.eval()
    with torch.no_grad():
        grown_logits = grown(tokens, positions, None)
        shallow_logits = shallow(tokens, positions, None)
        h = seen["h"]
        for _ in range(cfg.growth):
            for layer in shallow.decoder.layers:
                h, _ = layer(hidden_states=h, **seen["kw"])
        composed = shallow.decoder.final_layernorm(h)
    return {"copies": copies, "outside": sorted(outside), "unchanged": unchanged,
            "composed_diff": float((composed - seen["out"]).abs().max()),
            "shallow_vs_grown_logits": float((grown_logits - shallow_logits).abs().max())}


CHECKS = [check_growth_copies_and_composes_the_shallow_stack]

if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3]))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return run_worker(__file__, tmp_path_factory.mktemp("stacking_worker"), 300)


def test_growth_copies_layers_and_keeps_embeddings_and_head(worker):
    data = result(worker, "growth_copies_and_composes_the_shallow_stack")
    assert data["copies"] and data["unchanged"]
    assert data["outside"] == ["decoder.final_layernorm.weight", "embedding.word_embeddings.weight",
                               "output_layer.weight"]


def test_grown_model_is_the_shallow_stack_applied_twice_not_the_shallow_function(worker):
    data = result(worker, "growth_copies_and_composes_the_shallow_stack")
    assert data["composed_diff"] < 1e-6, data
    assert data["shallow_vs_grown_logits"] > 1e-3, data  # stacking does not preserve the function


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("stacking_run")
    r = torchrun("-m", "suite", "run", str(GROW), "--out", str(out))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    return {rec["variant"]: rec for rec in map(json.loads, (out / "records.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_run_counts_each_phases_flops_and_records_the_growth(records):
    assert {name: (rec["status"], rec["tp"], rec["pp"], rec["dp"]) for name, rec in records.items()} == \
        {"stacking": ("ok", 1, 1, 2), "stacking_tp2": ("ok", 2, 1, 1), "stacking_pp2": ("ok", 1, 2, 1),
         "stacking_g4": ("ok", 1, 1, 2)}
    for name, layers in (("stacking", [2, 4]), ("stacking_pp2", [2, 4]), ("stacking_g4", [1, 4])):
        spec, m = _spec(name), records[name]["metrics"]
        cfg = spec.tricks["stacking"]
        ext = m["extra"]["stacking"]
        phases = ext["phases"]
        assert [p["layers"] for p in phases] == layers and [p["steps"] for p in phases] == cfg.steps
        assert [p["flops"] for p in phases] == phase_flops(spec, cfg)
        assert m["flops_total"] == sum(phase_flops(spec, cfg)) and m["steps"] == sum(cfg.steps)
        # the loss right after the growth is recorded, beside the shallow model's last one: not preserved
        end, start = phases[0]["validation_at_end"], phases[1]["validation_at_start"]
        assert end is not None and start is not None and abs(end - start) > 1e-4
        assert phases[1]["transition_s"] > 0 and ext["transition_s"] == phases[1]["transition_s"]
        # the record's curve is the grown model's; extra keeps both phases
        assert all(step > cfg.steps[0] for step, *_ in m["validation_curve"])
        assert {p[4] for p in ext["validation_curve"]} == {0, 1}
        assert m["validation_loss"] == pytest.approx(phases[1]["validation_at_end"])


@pytest.mark.slow
def test_layouts_grow_and_train_the_same_function(records):
    curves = {v: [x for _, x in records[v]["metrics"]["loss_curve"]]
              for v in ("stacking", "stacking_tp2", "stacking_pp2")}
    for v in ("stacking_tp2", "stacking_pp2"):
        assert curves[v] == pytest.approx(curves["stacking"], rel=1e-5), v
        want = [c[1] for c in records["stacking"]["metrics"]["extra"]["stacking"]["validation_curve"]]
        got = [c[1] for c in records[v]["metrics"]["extra"]["stacking"]["validation_curve"]]
        assert got == pytest.approx(want, rel=1e-5), v


@pytest.mark.slow
def test_report_lists_both_phases_and_plots_both(records):
    from suite.report.plots import curve
    from suite.tricks.stacking.report import phases_section

    text = "\n".join(phases_section(list(records.values())))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| stacking_g4 ")]
    phases = records["stacking_g4"]["metrics"]["extra"]["stacking"]["phases"]
    assert [r[1:3] for r in rows] == [["shallow", "1 × 64"], ["grown ×4", "4 × 64"]]
    assert [int(r[5]) for r in rows] == [p["steps"] for p in phases]
    assert rows[0][10] == "—" and rows[1][10] != "—"
    assert float(rows[1][11]) == pytest.approx(phases[1]["validation_at_start"], abs=1e-3)
    points = curve(records["stacking_g4"])
    assert {p[4] for p in points} == {0, 1} and points[0][0] <= phases[0]["last_step"]
