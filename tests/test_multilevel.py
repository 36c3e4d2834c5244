"""Multi-level training (suite.tricks.multilevel): operators, function preservation, layouts, V-cycle.

Three kinds of tests, as in test_random_ltd.py:

* in the pytest process: config helpers, FLOPs, and the operators on plain tensors (torch only;
  ``synthetic_state`` builds megatron's global names and shapes, checked against a real model in the
  worker);
* single-process megatron-core checks in ONE worker subprocess (``python THIS_FILE --worker``), so
  that ``cpu_compat`` and ``parallel_state`` do not leak into other test files;
* multi-process ones (``@pytest.mark.slow``): the operators on TP=2 and PP=2 shards, and V-cycles
  through ``torchrun -m suite run``.

Tolerances: coalescing a de-coalesced model is exact (factor 2); the matrix forms of the operators
agree to 1e-6 (matmul rounding); de-coalescing preserves a real GPTModel's logits to 1e-5 relative to
the largest logit (fp32; the large model sums twice as many halved terms); layouts agree bitwise on
parameters and to 1e-5 on losses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
from check_worker import result, run_suite, run_worker, torchrun, worker_main

from suite.metrics import flops as F
from suite.tricks.multilevel import (MultilevelConfig, coalesced, factors, level_models, phase_flops,
                                     phase_levels, phase_spec)

ROOT = Path(__file__).resolve().parents[1]
VCYCLE = ROOT / "tests" / "scenarios" / "multilevel" / "vcycle.toml"


def cfg(**kw) -> MultilevelConfig:
    base = dict(levels=2, steps=[3, 4, 3], lr=None, width_factors=None, depth_factors=None, alpha=0.25)
    return MultilevelConfig(**{**base, **kw})


def spec(variant="vcycle", *overrides):
    from suite.scenario import load_scenario

    (v,) = load_scenario(VCYCLE, list(overrides), only=[variant])
    return v


def synthetic_state(layers=4, hidden=64, heads=8, groups=4, ffn=192, vocab=256, seed=0) -> dict:
    """Random full parameters under megatron's global names and shapes (QKV grouped, fc1 = [gate; up])."""
    import torch

    d = hidden // heads
    shapes = {"embedding.word_embeddings.weight": (vocab, hidden), "decoder.final_layernorm.weight": (hidden,),
              "output_layer.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,),
                       p + "self_attention.linear_qkv.weight": ((heads + 2 * groups) * d, hidden),
                       p + "self_attention.linear_proj.weight": (hidden, heads * d),
                       p + "pre_mlp_layernorm.weight": (hidden,),
                       p + "mlp.linear_fc1.weight": (2 * ffn, hidden), p + "mlp.linear_fc2.weight": (hidden, ffn)})
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}


def assert_states_equal(a: dict, b: dict):
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), f"{name}: max diff {(a[name] - b[name]).abs().max()}"


# --- 1. config, shapes, FLOPs (torch-free) --------------------------------------------------------

def test_phase_levels():
    assert phase_levels(2) == [0, 1, 0]
    assert phase_levels(3) == [0, 1, 2, 1, 0]


def test_level_shapes_halve_width_and_depth_keeping_head_size():
    m = spec().model
    shapes = [(x.num_layers, x.hidden_size, x.num_attention_heads, x.num_query_groups, x.ffn_hidden_size)
              for x in level_models(m, cfg(levels=3, steps=[3] * 5))]
    assert shapes == [(4, 64, 8, 4, 192), (2, 32, 4, 2, 96), (1, 16, 2, 1, 48)]
    assert factors(cfg(levels=3, width_factors=[2, 1], depth_factors=[1, 2])) == [(2, 1), (1, 2)]
    m2 = coalesced(m, 1, 2)
    assert (m2.num_layers, m2.hidden_size, m2.vocab_size, m2.max_sequence_length) == (2, 64, 256, 64)


def test_phase_spec_sets_shape_steps_and_lr():
    v = spec()
    c = v.tricks["multilevel"]
    assert c.steps == [3, 4, 3] and c.lr == [3e-3, 6e-3, 2e-3]
    small = phase_spec(v, c, 1)
    assert (small.model.num_layers, small.model.hidden_size) == (2, 32)
    assert small.workload.steps == 4 and small.tricks == {}
    assert small.workload.lr == 6e-3 and small.workload.min_lr == pytest.approx(6e-4)  # ratio kept
    assert phase_spec(v, c, 0).model == v.model and v.workload.steps == 10  # the spec itself unchanged
    assert phase_spec(v, c, 2).model == dataclasses.replace(v.model, init="random")  # starts from the level change


def hand_step_flops(layers, h, heads, groups, ffn, vocab, B, S) -> int:
    """3 × forward: QKV, scores, values, output projection, SwiGLU per layer, then the LM head."""
    d = h // heads
    layer = 2 * B * S * h * (h + 2 * groups * d) + 2 * 2 * B * S * S * h + 2 * B * S * h * h + 3 * 2 * B * S * h * ffn
    return 3 * (layers * layer + 2 * B * S * h * vocab)


def test_phase_flops_use_each_levels_formula():
    v = spec()
    B, S = v.workload.global_batch, v.workload.seq_length
    large, small = hand_step_flops(4, 64, 8, 4, 192, 256, B, S), hand_step_flops(2, 32, 4, 2, 96, 256, B, S)
    assert phase_flops(v, cfg()) == [3 * large, 4 * small, 3 * large]
    tiny = hand_step_flops(1, 16, 2, 1, 48, 256, B, S)
    assert phase_flops(v, cfg(levels=3, steps=[1, 2, 3, 4, 5])) == [large, 2 * small, 3 * tiny, 4 * small, 5 * large]
    assert phase_flops(v, cfg(), steps=[3, 4, 1]) == [3 * large, 4 * small, large]  # a run stopped early


# --- 2. the operators on plain tensors ------------------------------------------------------------

@pytest.mark.parametrize("width, depth", [(2, 1), (1, 2), (2, 2)])
def test_coalescing_a_decoalesced_model_is_exact(width, depth):
    from suite.tricks.multilevel import operators as ops

    small = synthetic_state(layers=2, hidden=32, heads=4, groups=2, ffn=96)
    large = ops.decoalesce(small, width, depth)
    assert large["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((8 + 8) * 8 // (2 // width), 32 * width)
    assert len([n for n in large if n.endswith("linear_fc2.weight")]) == 2 * depth
    assert_states_equal(ops.coalesce(large, width, depth), small)


def test_coalescing_a_decoalesced_model_factor_4_to_rounding():
    import torch

    from suite.tricks.multilevel import operators as ops

    small = synthetic_state(layers=1, hidden=16, heads=2, groups=2, ffn=48)
    back = ops.coalesce(ops.decoalesce(small, 4, 4), 4, 4)
    for name in small:
        assert torch.allclose(back[name], small[name], rtol=1e-6, atol=1e-7), name


def block_F(n_small: int, k: int):
    """The authors' default map F = norm([I I …]) (small × large): small unit j averages j + e·n_small."""
    import torch

    return torch.cat([torch.eye(n_small)] * k, dim=1) / k


def norm_rows(M):
    return M / M.sum(1, keepdim=True)


def expected_coalesced(name, W, k):
    """W_s = F_out · W · norm(F_inᵀ), written as matrices."""
    import torch

    Fm = lambda n: block_F(n // k, k)  # noqa: E731  (n: the large size)
    Sm = lambda n: norm_rows(block_F(n // k, k).T)  # noqa: E731  (sums the k copies)
    if name.endswith("word_embeddings.weight"):  # [V, h]: h is written (an output)
        return W @ Fm(W.shape[1]).T
    if name.endswith("output_layer.weight"):  # [V, h]: h is read (an input)
        return W @ Sm(W.shape[1])
    if name.endswith("layernorm.weight"):
        return Fm(W.shape[0]) @ W
    if name.endswith("linear_fc1.weight"):
        f = W.shape[0] // 2
        return torch.block_diag(Fm(f), Fm(f)) @ W @ Sm(W.shape[1])
    return Fm(W.shape[0]) @ W @ Sm(W.shape[1])


def expected_decoalesced(name, W, k):
    """W_l = T_out · W_s · norm(T_inᵀ) with T = norm(Fᵀ), written as matrices."""
    import torch

    Tm = lambda n: norm_rows(block_F(n, k).T)  # noqa: E731  (n: the small size; copies)
    Hm = lambda n: norm_rows(Tm(n).T)  # noqa: E731  (divides by k)
    if name.endswith("word_embeddings.weight"):
        return W @ Tm(W.shape[1]).T
    if name.endswith("output_layer.weight"):
        return W @ Hm(W.shape[1])
    if name.endswith("layernorm.weight"):
        return Tm(W.shape[0]) @ W
    if name.endswith("linear_fc1.weight"):
        f = W.shape[0] // 2
        return torch.block_diag(Tm(f), Tm(f)) @ W @ Hm(W.shape[1])
    return Tm(W.shape[0]) @ W @ Hm(W.shape[1])


def test_width_operators_are_the_matrix_forms():
    import torch

    from suite.tricks.multilevel import operators as ops

    large = synthetic_state(layers=1)
    small = ops.coalesce_width(large, 2)
    up = ops.decoalesce_width(small, 2)
    for name in large:
        assert torch.allclose(small[name], expected_coalesced(name, large[name], 2), atol=1e-6), name
        assert torch.allclose(up[name], expected_decoalesced(name, small[name], 2), atol=1e-6), name


def qkv_parts(W, heads, groups, d):
    """Megatron's grouped QKV rows [q…q k v] per query group -> (q per head, k per group, v per group)."""
    r = heads // groups
    blocks = W.reshape(groups, r + 2, d, W.shape[1])
    q = [blocks[h // r, h % r] for h in range(heads)]
    return q, [blocks[g, r] for g in range(groups)], [blocks[g, r + 1] for g in range(groups)]


def test_attention_merges_whole_heads_and_query_groups_in_megatrons_layout():
    """8 heads in 4 groups -> 4 heads in 2 groups: small head j = mean of large heads j and j + 4 (in
    groups j//2 and j//2 + 2), small group g = mean of large groups g and g + 2; input columns summed."""
    from suite.tricks.multilevel import operators as ops

    large = synthetic_state(layers=1)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    small = ops.coalesce_width(large, 2)
    q, k, v = qkv_parts(large[name], heads=8, groups=4, d=8)
    sq, sk, sv = qkv_parts(small[name], heads=4, groups=2, d=8)
    col_sum = lambda x: x[:, :32] + x[:, 32:]  # noqa: E731  (input channels c and c + 32 summed)
    for j in range(4):
        assert (j + 4) // 2 == j // 2 + 2  # the partner head lies in the partner group: GQA consistent
        assert ((sq[j] - col_sum((q[j] + q[j + 4]) / 2)).abs().max()) < 1e-6
    for g in range(2):
        assert ((sk[g] - col_sum((k[g] + k[g + 2]) / 2)).abs().max()) < 1e-6
        assert ((sv[g] - col_sum((v[g] + v[g + 2]) / 2)).abs().max()) < 1e-6
    # the output projection reads heads: its input columns (head j, dim c) and (head j + 4, dim c) are summed
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    P = large[proj]
    want = (P[:32] + P[32:]) / 2  # output rows averaged
    want = want[:, :32] + want[:, 32:]  # heads j and j + 4: columns j·8 + c and (j + 4)·8 + c
    assert (small[proj] - want).abs().max() < 1e-6


def test_swiglu_gate_and_up_are_merged_separately():
    from suite.tricks.multilevel import operators as ops

    large = synthetic_state(layers=1)
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    W, S = large[name], ops.coalesce_width(large, 2)[name]
    gate, up = W[:192], W[192:]
    merged = lambda x: ((x[:96] + x[96:]) / 2)[:, :32] + ((x[:96] + x[96:]) / 2)[:, 32:]  # noqa: E731
    assert (S[:96] - merged(gate)).abs().max() < 1e-6 and (S[96:] - merged(up)).abs().max() < 1e-6


def test_depth_pairs_adjacent_layers():
    import torch

    from suite.tricks.multilevel import operators as ops

    large = synthetic_state(layers=4)
    small = ops.coalesce_depth(large, 2)
    name = "mlp.linear_fc2.weight"
    for i in range(2):
        want = (large[f"decoder.layers.{2 * i}.{name}"] + large[f"decoder.layers.{2 * i + 1}.{name}"]) / 2
        assert torch.equal(small[f"decoder.layers.{i}.{name}"], want)
    assert torch.equal(small["output_layer.weight"], large["output_layer.weight"])
    up = ops.decoalesce_depth(small, 2)
    for i in range(4):
        assert torch.equal(up[f"decoder.layers.{i}.{name}"], small[f"decoder.layers.{i // 2}.{name}"])


def test_interpolation_endpoints_and_midpoint():
    import torch

    from suite.tricks.multilevel import operators as ops

    large = synthetic_state(seed=1)
    up = ops.decoalesce(ops.coalesce(synthetic_state(seed=2), 2, 2), 2, 2)
    assert_states_equal(ops.interpolate(large, up, 0.0), large)
    assert_states_equal(ops.interpolate(large, up, 1.0), up)
    mid = ops.interpolate(large, up, 0.25)
    for name in large:
        assert torch.allclose(mid[name], 0.75 * large[name] + 0.25 * up[name], atol=1e-7), name
    with pytest.raises(ValueError, match="parameter names differ"):
        ops.interpolate(large, ops.coalesce(up, 2, 2), 0.25)


def test_unknown_parameter_has_no_rule():
    import torch

    from suite.tricks.multilevel import operators as ops

    with pytest.raises(KeyError, match="no width rule"):
        ops.coalesce_width({"decoder.layers.0.self_attention.q_layernorm.bias": torch.zeros(8)}, 2)


# --- 3. the single-process worker (real megatron-core models) -------------------------------------

WORKER_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """Runs every check_* in one subprocess; {check name: {"error": str | None, "data": ...}}."""
    return run_worker(__file__, tmp_path_factory.mktemp("multilevel_worker"), WORKER_TIMEOUT_S)


def _build(model_config, seed=1234):
    """A real GPTModel (TP=1, PP=1) of the given [model] shape, in eval mode."""
    from suite.models import gpt

    s = dataclasses.replace(spec(), model=model_config, tricks={})
    (model,) = gpt.build_chunks(s, gpt.transformer_config(s))
    gpt.init_parameters([model], seed, s.model.init_std, s.model.num_layers)
    return model.eval()


def _logits(model):
    import torch

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 32), generator=gen)
    positions = torch.arange(32).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def check_synthetic_names_and_shapes_are_megatrons(tmp):
    from suite.tricks.multilevel.state import full_state

    m = spec().model
    for shape, model in [((4, 64, 8, 4, 192), m), ((2, 32, 4, 2, 96), coalesced(m, 2, 2))]:
        real = full_state([_build(model)])
        synth = synthetic_state(*shape)
        assert real.keys() == synth.keys()
        assert {n: tuple(t.shape) for n, t in real.items()} == {n: tuple(t.shape) for n, t in synth.items()}


def check_width_decoalescing_preserves_the_function(tmp):
    """A small model with random weights (std 0.3, norms ≠ 1, so attention is far from uniform) and
    its width de-coalesced copy (2 layers each: 32 -> 64 wide, 4 -> 8 heads, 2 -> 4 query groups)."""
    import torch

    from suite.tricks.multilevel import operators as ops
    from suite.tricks.multilevel.state import full_state, load_state

    m = spec().model
    small_model, large_model = _build(coalesced(m, 2, 2)), _build(coalesced(m, 1, 2))
    gen = torch.Generator().manual_seed(5)
    theta = {n: (1 + 0.3 * torch.randn(t.shape, generator=gen)) if t.dim() == 1 else 0.3 * torch.randn(t.shape, generator=gen)
             for n, t in full_state([small_model]).items()}
    load_state([small_model], theta)
    assert_states_equal(full_state([small_model]), theta)
    up = ops.decoalesce_width(theta, 2)
    load_state([large_model], up)
    small, large = _logits(small_model), _logits(large_model)
    scale = float(small.abs().max())
    diff = float((small - large).abs().max())
    # the authors' GPT-2 embedding scaling (×0.5 after de-coalescing) is not function-preserving here
    halved = dict(up, **{"embedding.word_embeddings.weight": 0.5 * up["embedding.word_embeddings.weight"]})
    load_state([large_model], halved)
    diff_halved = float((small - _logits(large_model)).abs().max())
    # nor is depth de-coalescing (each layer runs twice)
    deep = _build(m)
    load_state([deep], ops.decoalesce(theta, 2, 2))
    diff_depth = float((small - _logits(deep)).abs().max())
    # and coalescing returns the small model exactly, on the real parameter names
    assert_states_equal(ops.coalesce(ops.decoalesce(theta, 2, 2), 2, 2), theta)
    return {"logit_scale": scale, "diff": diff, "diff_embedding_halved": diff_halved, "diff_depth": diff_depth,
            "logit_std": float(small.std())}


def check_bf16_master_weights_are_read_and_written(tmp):
    """Under bf16 megatron's optimizer keeps fp32 copies in ``param.main_param``: the state comes
    from them and goes to both (attached by hand here: the check needs no optimizer)."""
    import torch

    from suite.tricks.multilevel.state import full_state, load_state

    model = _build(spec().model)
    for p in model.parameters():
        p.main_param = torch.full(p.shape, 0.5)
    state = full_state([model])
    assert all(torch.equal(t, torch.full(t.shape, 0.5)) for t in state.values())
    target = {n: torch.full(t.shape, 0.25) for n, t in state.items()}
    load_state([model], target)
    for p in model.parameters():
        assert torch.equal(p.main_param, torch.full(p.shape, 0.25)) and torch.equal(p.detach(), p.main_param)


CHECKS = [check_synthetic_names_and_shapes_are_megatrons, check_width_decoalescing_preserves_the_function,
          check_bf16_master_weights_are_read_and_written]


def test_synthetic_state_has_megatrons_names_and_shapes(worker):
    result(worker, "synthetic_names_and_shapes_are_megatrons")


def test_width_decoalescing_preserves_a_real_models_logits(worker):
    data = result(worker, "width_decoalescing_preserves_the_function")
    assert data["logit_std"] > 0.5  # not a near-constant function
    assert data["diff"] < 1e-5 * data["logit_scale"], data
    assert data["diff_embedding_halved"] > 1e3 * max(data["diff"], 1e-7), data
    assert data["diff_depth"] > 1e3 * max(data["diff"], 1e-7), data


def test_bf16_master_weights_are_read_and_written(worker):
    result(worker, "bf16_master_weights_are_read_and_written")


# --- 4. TP and PP shards (2 processes) ------------------------------------------------------------

LAYOUT_SCRIPT = r'''
import dataclasses, sys
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from suite.launch import cpu_compat
from suite.models import gpt
from suite.scenario import load_scenario
from suite.tricks.multilevel import operators as ops, phase_spec
from suite.tricks.multilevel.state import full_state, load_state

cpu_compat.enable()
dist.init_process_group("gloo")
(spec,) = load_scenario(sys.argv[2], only=["vcycle"])
cfg = spec.tricks["multilevel"]
for name, tp, pp in [("tp1", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2)]:
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)

    def build(phase, seed):
        s = phase_spec(spec, cfg, phase)
        s = dataclasses.replace(s, parallel=dataclasses.replace(s.parallel, tp=tp, pp=pp))
        chunks = gpt.build_chunks(s, gpt.transformer_config(s))
        gpt.init_parameters(chunks, seed, s.model.init_std, s.model.num_layers)
        return chunks

    theta = full_state(build(0, 1))
    small = build(1, 2)
    load_state(small, ops.coalesce(theta, 2, 2))
    small_state = full_state(small)
    other = full_state(build(1, 3))  # stands in for the trained small model
    large = build(2, 4)
    load_state(large, ops.interpolate(theta, ops.decoalesce(other, 2, 2), 0.25))
    out = {"theta": theta, "small": small_state, "other": other, "up": full_state(large),
           "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()}
    if dist.get_rank() == 0:
        torch.save(out, f"{sys.argv[1]}/{name}.pt")
    ps.destroy_model_parallel()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_operators_on_tp_and_pp_shards_give_the_tp1_parameters(tmp_path):
    import torch

    from suite.tricks.multilevel import operators as ops

    script = tmp_path / "layouts.py"
    script.write_text(LAYOUT_SCRIPT)
    r = torchrun(str(script), str(tmp_path), str(VCYCLE))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    got = {name: torch.load(tmp_path / f"{name}.pt") for name in ("tp1", "tp2", "pp2")}
    assert [(got[n]["tp"], got[n]["pp"]) for n in ("tp1", "tp2", "pp2")] == [(1, 1), (2, 1), (1, 2)]
    ref = got["tp1"]
    assert_states_equal(ref["small"], ops.coalesce(ref["theta"], 2, 2))
    assert_states_equal(ref["up"], ops.interpolate(ref["theta"], ops.decoalesce(ref["other"], 2, 2), 0.25))
    for name in ("tp2", "pp2"):
        for key in ("theta", "small", "other", "up"):
            assert_states_equal(got[name][key], ref[key])


# --- 5. the V-cycle through `torchrun -m suite run` (2 processes) ---------------------------------

@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("multilevel_run")
    # every variant saves to the same folder, replacing the previous one: the last, vcycle_target, stays
    r = torchrun("-m", "suite", "run", str(VCYCLE), "--out", str(out), "--set",
                 f'workload.save_checkpoint="{out / "checkpoint"}"', timeout=300)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return {rec["variant"]: rec for rec in recs}


@pytest.mark.slow
def test_vcycle_saves_the_full_size_model_it_ends_with(records, tmp_path):
    """The saved checkpoint, loaded on one process by the accuracy workload, scores the held-out text as
    the V-cycle's final model did (at DP=2, through megatron's schedule)."""
    ckpt = Path(records["vcycle_target"]["config"]["workload"]["save_checkpoint"])
    r = run_suite("run", VCYCLE, "--variant", "baseline", "--out", tmp_path, "--set", 'workload.kind="accuracy"',
                  "--set", f'model.init="checkpoint:{ckpt}"', timeout_s=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (rec,) = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    loaded = rec["metrics"]["accuracy"]["original"]
    final = records["vcycle_target"]["metrics"]["heldout"]
    assert loaded["tokens"] == final["tokens"] and abs(loaded["loss"] - final["loss"]) < 1e-5 * final["loss"]
    assert abs(records["baseline"]["metrics"]["heldout"]["loss"] - final["loss"]) > 1e-3  # not the baseline's


@pytest.mark.slow
def test_vcycle_records_are_ok_with_per_phase_extra(records):
    assert set(records) == {"baseline", "vcycle", "vcycle_tp2", "vcycle_pp2", "vcycle3", "vcycle_target"}
    for name, rec in records.items():
        assert rec["status"] == "ok", (name, rec.get("error"))
    m = records["vcycle"]["metrics"]
    ml = m["extra"]["multilevel"]
    assert (ml["levels"], ml["alpha"], ml["width_factors"], ml["depth_factors"]) == (2, 0.25, [2], [2])
    phases = ml["phases"]
    assert [(p["level"], p["layers"], p["hidden"], p["heads"], p["groups"], p["ffn"]) for p in phases] == \
        [(0, 4, 64, 8, 4, 192), (1, 2, 32, 4, 2, 96), (0, 4, 64, 8, 4, 192)]
    assert [(p["first_step"], p["last_step"], p["steps"]) for p in phases] == [(1, 3, 3), (4, 7, 4), (8, 10, 3)]
    assert [p["lr"] for p in phases] == [3e-3, 6e-3, 2e-3]
    assert m["steps"] == 10 and m["tokens"] == 10 * 8 * 32 == sum(p["tokens"] for p in phases)
    # continuous step numbering: the training loss curve runs across the phases
    assert [s for s, _ in m["loss_curve"]] == list(range(1, 11))
    assert [[s, p] for s, _, p in ml["loss_curve"]] == [[s, 0 if s <= 3 else 1 if s <= 7 else 2] for s in range(1, 11)]
    assert all(math.isfinite(x) for _, x in m["loss_curve"])
    # every 2 steps and at the end of each phase; the record's curve holds the final phase's points
    assert [(c[0], c[4]) for c in ml["validation_curve"]] == [(2, 0), (3, 0), (4, 1), (6, 1), (7, 1), (8, 2), (10, 2)]
    assert m["validation_curve"] == [c[:4] for c in ml["validation_curve"][-2:]]
    assert m["validation_loss"] == ml["validation_curve"][-1][1] == phases[-1]["validation_at_end"]
    assert phases[0]["validation_at_start"] is None and phases[1]["validation_at_start"] is not None
    # walltime: steps of all phases plus the level changes; curve points grow with it
    assert ml["transition_s"] == pytest.approx(phases[1]["transition_s"] + phases[2]["transition_s"])
    assert m["walltime_s"] == pytest.approx(sum(p["walltime_s"] for p in phases))
    assert m["walltime_s"] > ml["transition_s"] > 0
    walls = [c[2] for c in ml["validation_curve"]]
    assert walls == sorted(walls) and walls[-1] == pytest.approx(m["walltime_s"])
    assert m["timed_steps"] == 10 - 3 * 1  # each phase's first (warm-up) step is not timed
    # start-up is the run's first warm-up step, as for plain training: later phases' first steps are the
    # technique's own cost
    assert 0 < m["warmup_walltime_s"] < phases[0]["walltime_s"]


@pytest.mark.slow
def test_vcycle_flops_add_up_per_level(records):
    from suite.scenario import load_scenario

    for name in ("vcycle", "vcycle3", "vcycle_target"):
        (v,) = load_scenario(VCYCLE, only=[name])
        c, w = v.tricks["multilevel"], v.workload
        m = records[name]["metrics"]
        phases = m["extra"]["multilevel"]["phases"]
        per_step = [F.train_step_flops(F.Shape.of(model), w.global_batch, w.seq_length)
                    for model in level_models(v.model, c)]
        for p in phases:
            assert p["flops_per_step"] == per_step[p["level"]], (name, p)
            assert p["flops"] == p["steps"] * per_step[p["level"]], (name, p)
        assert sum(p["flops"] for p in phases) == m["flops_total"], name
        assert [p["flops"] for p in phases] == phase_flops(v, c, [p["steps"] for p in phases]), name
        assert m["flops_per_step"] == per_step[0]  # the last step is the large model's
        points = m["extra"]["multilevel"]["validation_curve"]
        assert points[-1][3] == m["flops_total"]
    base = records["baseline"]["metrics"]
    assert base["flops_total"] == 10 * per_step[0]
    assert records["vcycle"]["metrics"]["flops_total"] < base["flops_total"]


@pytest.mark.slow
def test_vcycle_layouts_train_the_same_function(records):
    assert [(records[v]["tp"], records[v]["pp"], records[v]["dp"]) for v in ("vcycle", "vcycle_tp2", "vcycle_pp2")] \
        == [(1, 1, 2), (2, 1, 1), (1, 2, 1)]
    curves = {v: [x for _, x in records[v]["metrics"]["loss_curve"]] for v in ("vcycle", "vcycle_tp2", "vcycle_pp2")}
    for v in ("vcycle_tp2", "vcycle_pp2"):
        for step, (a, b) in enumerate(zip(curves["vcycle"], curves[v]), start=1):
            assert b == pytest.approx(a, rel=1e-5), f"{v} step {step}: {b} vs dp {a}"
        vals = [c[1] for c in records[v]["metrics"]["extra"]["multilevel"]["validation_curve"]]
        want = [c[1] for c in records["vcycle"]["metrics"]["extra"]["multilevel"]["validation_curve"]]
        assert vals == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_heldout_text_scores_the_final_full_size_model(records):
    """metrics.heldout comes from the model the V-cycle ends with: on the default token count (one
    validation's windows) its loss is the final validation loss, at every layout."""
    for name, rec in records.items():
        m = rec["metrics"]
        held = m["heldout"]
        assert held is not None and (held["tokens"], held["bytes"], held["seq_length"]) == (256, 256, 32), name
        assert held["loss"] == pytest.approx(m["validation_loss"], rel=1e-5), name
        assert held["perplexity"] == pytest.approx(math.exp(held["loss"]), rel=1e-12)
    want = records["vcycle"]["metrics"]["heldout"]["loss"]
    for name in ("vcycle_tp2", "vcycle_pp2"):
        assert records[name]["metrics"]["heldout"]["loss"] == pytest.approx(want, rel=1e-5), name


@pytest.mark.slow
def test_three_level_vcycle(records):
    m = records["vcycle3"]["metrics"]
    phases = m["extra"]["multilevel"]["phases"]
    assert [(p["level"], p["layers"], p["hidden"], p["heads"], p["groups"]) for p in phases] == \
        [(0, 4, 64, 8, 4), (1, 2, 32, 4, 2), (2, 1, 16, 2, 1), (1, 2, 32, 4, 2), (0, 4, 64, 8, 4)]
    assert m["steps"] == 10 and m["extra"]["multilevel"]["alpha"] == 0.5
    assert m["validation_loss"] is not None and math.isfinite(m["validation_loss"])


@pytest.mark.slow
def test_target_loss_stops_the_vcycle_in_its_final_phase(records):
    m = records["vcycle_target"]["metrics"]
    ml = m["extra"]["multilevel"]
    target = m["target"]
    assert target["target_loss"] == 4.95 and target["reached"]
    # an earlier phase (the small model) got below the target without stopping the run
    assert any(c[1] <= 4.95 and c[4] < 2 for c in ml["validation_curve"])
    final = [c for c in ml["validation_curve"] if c[4] == 2]
    hit = next(c for c in final if c[1] <= 4.95)
    assert target["steps"] == m["steps"] == hit[0] < 15  # stopped before the final phase's 8 steps
    assert target["flops"] == hit[3] == m["flops_total"]
    assert target["walltime_s"] == pytest.approx(hit[2]) and target["tokens"] == hit[0] * 8 * 32
    assert ml["phases"][-1]["steps"] == hit[0] - 7
    assert m["validation_curve"][-1][:2] == hit[:2]


@pytest.mark.slow
def test_report_reaches_the_target_in_the_final_phase_only(records):
    from suite.report.quality import quality_rows
    from suite.report.render import build_rows

    rows = {r["variant"]: r for r in build_rows({(r["scenario"], r["variant"]): r for r in records.values()})}
    assert rows["vcycle3"]["extra.multilevel.levels"] == 3  # scalars become columns, curves do not
    assert not any(k.startswith("extra.multilevel.phases") for k in rows["vcycle3"])
    target, qrows = quality_rows(list(records.values()))
    hit = {r["variant"]: r for r in qrows}["vcycle_target"]
    assert target == 4.95 and hit["reached"] and hit["step"] == records["vcycle_target"]["metrics"]["steps"]


@pytest.mark.slow
def test_report_lists_every_phase_of_a_vcycle(records):
    """The phases table: one row per phase with its level's shape, steps and FLOPs, as recorded."""
    from suite.tricks.multilevel.report import phases_section

    text = "\n".join(phases_section(list(records.values())))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| vcycle3 ")]
    phases = records["vcycle3"]["metrics"]["extra"]["multilevel"]["phases"]
    assert [r[1:3] for r in rows] == [[str(i + 1), f"{p['layers']} × {p['hidden']}"] for i, p in enumerate(phases)]
    assert [int(r[5]) for r in rows] == [p["steps"] for p in phases]
    assert sum(p["flops"] for p in phases) == records["vcycle3"]["metrics"]["flops_total"]
    assert rows[0][10] == "—" and rows[1][10] != "—"  # the first phase has no level change before it
    assert phases_section([r for r in records.values() if "multilevel" not in (r["metrics"].get("extra") or {})]) == []


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3]))
