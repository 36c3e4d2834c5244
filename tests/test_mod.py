"""Mixture-of-Depths (suite.tricks.mixture_of_depths): dense equality, router gradients, per-sequence top-k,
causality for a fixed selection, FLOPs, and through `torchrun -m suite run` (2 processes): DP, TP and PP
train the same function, the records' FLOPs, and a checkpoint saved at PP=2 loading on one process.

Torch-free tests run in the pytest process; megatron-core checks run in one worker subprocess
(``python THIS_FILE --worker``, see ``check_worker``), as in tests/test_random_ltd.py, whose explicit-matmul
core attention the FLOP check borrows (FlopCounterMode does not count CPU SDPA).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from check_worker import result, run_suite, run_worker, torchrun, worker_main

from suite.errors import UserError
from suite.metrics import flops as F
from suite.tricks.mixture_of_depths import MixtureOfDepthsConfig, kept_tokens, routed_layers, step_flops

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "tests" / "scenarios" / "mixture_of_depths" / "unit.toml"
LAYOUTS = UNIT.with_name("layouts.toml")


def cfg(**kw) -> MixtureOfDepthsConfig:
    return MixtureOfDepthsConfig(**{**dict(capacity=0.125, layers=None, router_scale="sigmoid"), **kw})


# --- torch-free ----------------------------------------------------------------------------------

def test_routed_layers_default_every_other_layer():
    assert routed_layers(cfg(), 12) == [1, 3, 5, 7, 9, 11]
    assert routed_layers(cfg(), 5) == [1, 3]
    assert routed_layers(cfg(layers=[4, 0]), 12) == [0, 4]


def test_kept_tokens_follow_the_capacity():
    assert [kept_tokens(cfg(capacity=c), 2048) for c in (0.125, 0.25, 0.5, 1.0)] == [256, 512, 1024, 2048]
    assert kept_tokens(cfg(capacity=0.3), 10) == 3


def test_step_flops_by_hand_and_at_full_capacity():
    shape = F.Shape(layers=4, hidden=64, heads=4, groups=2, ffn=128, vocab=256)
    B, S = 2, 64

    def layer(tokens):  # QKV, scores + values, projection, SwiGLU
        return (2 * B * tokens * 64 * (64 + 2 * 2 * 16) + 4 * B * tokens * tokens * 64 + 2 * B * tokens * 64 * 64
                + 6 * B * tokens * 64 * 128)

    head, router = 2 * B * S * 64 * 256, 2 * B * S * 64
    assert step_flops(cfg(capacity=0.25), shape, B, S) == 3 * (2 * (layer(16) + router) + 2 * layer(64) + head)
    dense = F.train_step_flops(shape, B, S)
    assert step_flops(cfg(capacity=1.0), shape, B, S) == dense + 3 * 2 * router  # the routers are the extra
    assert step_flops(cfg(capacity=0.125, layers=[]), shape, B, S) == dense


def test_validation_refuses_bad_settings():
    section = "tricks.mixture_of_depths."
    for override, key in [(section + "layers=[4]", section + "layers"),
                          (section + "layers=[1, 1]", section + "layers"),
                          (section + "capacity=0.01", section + "capacity"),
                          (section + "capacity=1.5", section + "capacity"),
                          (section + 'router_scale="softmax"', section + "router_scale"),
                          ("tricks.random_ltd.min_kept=16", "tricks")]:
        with pytest.raises(UserError) as e:
            _spec(override)
        assert e.value.key == key, (override, e.value)


# --- the single-process worker --------------------------------------------------------------------

def _spec(*overrides):
    from suite.scenario import load_scenario

    (v,) = load_scenario(UNIT, list(overrides))
    return v


def _model(spec, layer=None):
    from suite.models import gpt
    from suite.models.build import build
    from suite.tricks.mixture_of_depths.layer import MixtureOfDepthsRuntime

    if layer is None:
        layer = MixtureOfDepthsRuntime(spec, spec.tricks["mixture_of_depths"]).layer_spec(gpt.layer_spec())
    (model,) = build(spec, layer, log=lambda *a: None).chunks
    return model


def _batch(spec):
    import torch

    from suite.data.tokens import TokenSource

    batch = TokenSource(spec).train_batch(0, spec.workload.micro_batch)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    return tokens, labels, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def _forward_backward(model, tokens, labels, positions):
    import torch

    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, None)
    torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    return logits.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def check_full_capacity_without_scaling_is_the_dense_model(tmp):
    """capacity 1, router_scale none: logits and every shared parameter's gradient equal the dense model's."""
    import torch

    from suite.models import gpt

    spec = _spec("tricks.mixture_of_depths.capacity=1.0", 'tricks.mixture_of_depths.router_scale="none"')
    routed, dense = _model(spec), _model(spec, gpt.layer_spec())
    assert {n for n, _ in routed.named_parameters()} - {n for n, _ in dense.named_parameters()} == \
        {"decoder.layers.1.router.weight", "decoder.layers.3.router.weight"}
    batch = _batch(spec)
    logits_r, grads_r = _forward_backward(routed, *batch)
    logits_d, grads_d = _forward_backward(dense, *batch)
    out = {"max_logit_diff": float((logits_r - logits_d).abs().max()),
           "max_grad_diff": max(float((grads_r[n] - g).abs().max()) for n, g in grads_d.items()),
           "router_grads_none": [grads_r[f"decoder.layers.{i}.router.weight"] is None for i in (1, 3)]}
    # not vacuous: the sigmoid-scaled model and a smaller capacity compute other functions
    for override in ['tricks.mixture_of_depths.router_scale="sigmoid"', "tricks.mixture_of_depths.capacity=0.5"]:
        other = _spec("tricks.mixture_of_depths.capacity=1.0", 'tricks.mixture_of_depths.router_scale="none"', override)
        with torch.no_grad():
            out[override] = float((_model(other)(*batch[::2], None) - logits_d).abs().max())
    return out


def check_router_gets_gradients(tmp):
    """With a scaling router weight the loss reaches the router; with none it does not."""
    out = {}
    for scale in ("sigmoid", "linear", "none"):
        spec = _spec(f'tricks.mixture_of_depths.router_scale="{scale}"')
        _, grads = _forward_backward(_model(spec), *_batch(spec))
        g = grads["decoder.layers.1.router.weight"]
        out[scale] = None if g is None else float(g.abs().sum())
    return out


def _layer_io(model, layer_id, hidden, kwargs):
    import torch

    layer = model.decoder.layers[layer_id]
    with torch.no_grad():
        out, _ = layer(hidden_states=hidden, **kwargs)
        scores = layer.router(hidden).squeeze(-1)  # [s, b]
    return out, scores


def check_top_k_per_sequence_and_causal_for_a_fixed_selection(tmp):
    """One routed layer: each sequence's k top-scored tokens change, every other token passes unchanged;
    a later token's change that keeps the selection leaves earlier outputs bitwise equal, one that changes
    the selection can change an earlier token's output (the selection is not causal)."""
    import torch

    spec = _spec()
    model = _model(spec)
    model.train()
    tokens, _, positions = _batch(spec)
    seen = {}
    hook = model.decoder.layers[1].register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=kw["hidden_states"].detach().clone(),
                                     kw={k: v for k, v in kw.items() if k != "hidden_states"}), with_kwargs=True)
    with torch.no_grad():
        model(tokens, positions, None)
    hook.remove()
    h, kw = seen["h"], seen["kw"]
    s, b = h.shape[:2]
    k = kept_tokens(spec.tricks["mixture_of_depths"], s)
    out, scores = _layer_io(model, 1, h, kw)
    changed = (out != h).any(-1)  # [s, b]
    per_sequence = []
    for i in range(b):
        top = set(scores[:, i].topk(k).indices.tolist())
        per_sequence.append({"changed": sorted(torch.nonzero(changed[:, i]).flatten().tolist()), "top": sorted(top)})
    # a change of the last token orthogonal to the router keeps every score, so the selection
    w = model.decoder.layers[1].router.weight.detach()[0]
    noise = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(3))
    noise = noise - (noise @ w) / (w @ w) * w
    h2 = h.clone()
    h2[-1] += 5 * noise
    out2, scores2 = _layer_io(model, 1, h2, kw)
    same_selection = all(set(scores[:, i].topk(k).indices.tolist()) == set(scores2[:, i].topk(k).indices.tolist())
                         for i in range(b))
    earlier_equal = bool(torch.equal(out2[:-1], out[:-1]))
    last_changed = bool((out2[-1] != out[-1]).any())
    # push the last token to the top of sequence 0: it evicts the k-th token, whose output changes
    h3 = h.clone()
    h3[-1, 0] += 100 * w / (w @ w).sqrt() * scores[:, 0].abs().max() / w.norm()
    out3, scores3 = _layer_io(model, 1, h3, kw)
    evicted = sorted(set(scores[:, 0].topk(k).indices.tolist()) - set(scores3[:, 0].topk(k).indices.tolist()))
    evicted_changed = [bool((out3[j, 0] != out[j, 0]).any()) for j in evicted]
    return {"k": k, "s": s, "per_sequence": per_sequence, "same_selection": same_selection,
            "earlier_equal": earlier_equal, "last_changed": last_changed, "evicted": evicted,
            "evicted_output_changed": evicted_changed}


def check_flops(tmp):
    """step_flops against FlopCounterMode (forward + backward, explicit-matmul attention) at 3 capacities."""
    from torch.utils.flop_counter import FlopCounterMode

    from suite.models import gpt
    from suite.tricks.mixture_of_depths.layer import MixtureOfDepthsRuntime
    from test_random_ltd import _matmul_attention_class

    rows = []
    for capacity in (0.25, 0.5, 1.0):
        spec = _spec(f"tricks.mixture_of_depths.capacity={capacity}")
        assert spec.workload.micro_batch == spec.workload.global_batch  # one micro-batch is the whole step
        layer = gpt.layer_spec()
        layer.submodules.self_attention.submodules.core_attention = _matmul_attention_class()
        model = _model(spec, MixtureOfDepthsRuntime(spec, spec.tricks["mixture_of_depths"]).layer_spec(layer))
        tokens, labels, positions = _batch(spec)
        model.train()
        with FlopCounterMode(display=False) as fc:
            model(tokens, positions, None, labels=labels).float().mean().backward()
        rows.append({"capacity": capacity, "counted": fc.get_total_flops(),
                     "analytic": step_flops(spec.tricks["mixture_of_depths"], F.Shape.of(spec.model),
                                            spec.workload.global_batch, spec.workload.seq_length)})
    return rows


CHECKS = [check_full_capacity_without_scaling_is_the_dense_model, check_router_gets_gradients,
          check_top_k_per_sequence_and_causal_for_a_fixed_selection, check_flops]

if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3]))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return run_worker(__file__, tmp_path_factory.mktemp("mod_worker"), 300)


def test_full_capacity_without_router_scaling_equals_the_dense_model(worker):
    data = result(worker, "full_capacity_without_scaling_is_the_dense_model")
    assert data["max_logit_diff"] == 0.0 and data["max_grad_diff"] == 0.0, data
    assert data["router_grads_none"] == [True, True]  # r = 1: the loss does not reach the router
    assert all(v > 1e-4 for k, v in data.items() if k.startswith("tricks.")), data


def test_router_weight_carries_the_gradient_to_the_router(worker):
    data = result(worker, "router_gets_gradients")
    assert data["sigmoid"] > 0 and data["linear"] > 0, data
    assert data["none"] is None, data


def test_top_k_is_per_sequence_and_attention_is_causal_for_a_fixed_selection(worker):
    data = result(worker, "top_k_per_sequence_and_causal_for_a_fixed_selection")
    assert data["k"] == data["s"] // 4
    for seq in data["per_sequence"]:
        assert seq["changed"] == seq["top"] and len(seq["top"]) == data["k"]
    assert data["per_sequence"][0]["top"] != data["per_sequence"][1]["top"]  # chosen per sequence
    assert data["same_selection"] and data["earlier_equal"] and data["last_changed"]
    assert data["evicted"] and all(data["evicted_output_changed"])  # the selection itself looks ahead


def test_step_flops_match_flop_counter(worker):
    rows = result(worker, "flops")
    for row in rows:
        assert abs(row["counted"] - row["analytic"]) / row["analytic"] < 0.02, row
    assert [r["counted"] for r in rows] == sorted(r["counted"] for r in rows)


def test_config_is_a_dataclass_with_documented_fields():
    for f in dataclasses.fields(MixtureOfDepthsConfig):
        assert f.metadata.get("doc"), f.name


# --- layouts (2 processes) and the checkpoint --------------------------------------------------------

@pytest.fixture(scope="module")
def layout_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("mod_layouts")
    # every variant saves to the same folder, replacing the previous one: the last, pp2, stays
    r = torchrun("-m", "suite", "run", str(LAYOUTS), "--out", str(out), "--set",
                 f'workload.save_checkpoint="{out / "checkpoint"}"')
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    records = {rec["variant"]: rec for rec in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    return records, out / "checkpoint"


@pytest.mark.slow
def test_layouts_train_the_same_function(layout_records):
    records, _ = layout_records
    assert {v: (rec["status"], rec["tp"], rec["pp"], rec["dp"]) for v, rec in records.items()} == \
        {"dp": ("ok", 1, 1, 2), "tp2": ("ok", 2, 1, 1), "pp2": ("ok", 1, 2, 1)}
    curves = {v: [x for _, x in rec["metrics"]["loss_curve"]] for v, rec in records.items()}
    for v in ("tp2", "pp2"):
        assert curves[v] == pytest.approx(curves["dp"], rel=1e-5), v
        assert records[v]["metrics"]["validation_loss"] == pytest.approx(records["dp"]["metrics"]["validation_loss"],
                                                                         rel=1e-5)


@pytest.mark.slow
def test_checkpoint_saved_at_pp2_loads_on_one_process_with_its_routers(layout_records, tmp_path):
    """The routers are keyed by their global layer in the checkpoint: the PP=2 run's final model, loaded on
    one process and stepped at a vanishing LR, validates as it did."""
    records, checkpoint = layout_records
    r = run_suite("run", LAYOUTS, "--variant", "dp", "--out", tmp_path, "--set",
                  f'model.init="checkpoint:{checkpoint}"', "--set", "workload.lr=1e-30", "--set", "workload.min_lr=0",
                  "--set", "workload.steps=2", timeout_s=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (rec,) = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert rec["metrics"]["validation_loss"] == pytest.approx(records["pp2"]["metrics"]["validation_loss"], rel=1e-6)
    assert rec["metrics"]["heldout"]["loss"] == pytest.approx(records["pp2"]["metrics"]["heldout"]["loss"], rel=1e-6)


@pytest.mark.slow
def test_records_hold_the_exact_flops_and_the_routing(layout_records):
    records, _ = layout_records
    (spec,) = [v for v in _load(LAYOUTS) if v.name == "dp"]
    want = step_flops(spec.tricks["mixture_of_depths"], F.Shape.of(spec.model), 4, 64)
    for rec in records.values():
        m = rec["metrics"]
        assert m["flops_total"] == 4 * want and m["flops_per_step"] == want
        extra = m["extra"]["mixture_of_depths"]
        assert extra["routed_layers"] == [1, 3] and extra["kept_tokens"] == 16 and extra["router_scale"] == "sigmoid"
        assert extra["layer_token_fraction"] == pytest.approx((2 * 16 + 2 * 64) / (4 * 64))


def _load(path):
    from suite.scenario import load_scenario

    return load_scenario(path)
