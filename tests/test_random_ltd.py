"""Random-LTD (suite.tricks.random_ltd): schedule, LayerToken LR, the dropping layer, layouts, FLOPs.

Three kinds of tests:

* torch-free ones run in the pytest process (kept-length schedule, layer-tokens, LR hand formula);
* single-process megatron-core checks run in ONE worker subprocess (``python THIS_FILE --worker``):
  they need ``torch.distributed`` (gloo, world 1), ``cpu_compat.enable()`` (which patches torch
  globally) and megatron's ``parallel_state``, none of which may leak into other test files. The
  worker runs every ``check_*`` function below and writes {name: {"error", "data"}} as JSON; each
  pytest test asserts on its entry;
* multi-process ones (``@pytest.mark.slow``) launch ``torch.distributed.run`` with 2 CPU processes.

FlopCounterMode note (torch 2.13, CPU): ``F.scaled_dot_product_attention`` dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu`` (and ``..._backward``), which
``torch.utils.flop_counter`` does not register, so the suite's SDPA core attention counts 0 FLOPs
there. The FLOP test therefore swaps a test-local core attention with explicit matmuls into the
layer spec (``MatmulAttention``, checked to compute the same function as ``SDPAttention``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from check_worker import result, run_worker, torchrun, worker_main

from suite.metrics import flops as F
from suite.tricks.random_ltd import (RandomLTDConfig, dropping_layers, kept_length, layer_tokens,
                                     step_flops)

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "scenarios" / "random_ltd"
UNIT = SCENARIOS / "unit.toml"
LAYOUTS = SCENARIOS / "layouts.toml"


def cfg(**kw) -> RandomLTDConfig:
    """A config with every field given (the dataclass defaults are doc() fields)."""
    base = dict(layers=None, min_kept=128, schedule_steps=1000, step_size=16, schedule="fixed_linear",
                layer_token_lr=True)
    return RandomLTDConfig(**{**base, **kw})


# --- 1. kept-length schedule and layer-tokens (pure) ----------------------------------------------

def hand_kept(t: int, S: int, r0: int, R: int, step: int) -> int:
    """r_t = min(S, v − v mod step), v = floor(t/R·(S−r0) + r0), in exact rational arithmetic."""
    v = math.floor(Fraction(t, R) * (S - r0) + r0)
    return min(S, v - v % step)


@pytest.mark.parametrize("S, r0, R, step", [(64, 16, 4, 8), (128, 32, 10, 16), (2048, 128, 1000, 16),
                                            (512, 64, 7, 32), (1024, 16, 3, 16)])
def test_kept_length_matches_hand_formula(S, r0, R, step):
    c = cfg(min_kept=r0, schedule_steps=R, step_size=step)
    points = sorted({0, 1, R // 3, R // 2, (2 * R) // 3, R - 1, R, R + 1, 2 * R, 10 * R + 7})
    for t in points:
        assert kept_length(c, t, S) == hand_kept(t, S, r0, R, step), t
    assert kept_length(c, 0, S) == r0 - r0 % step
    assert kept_length(c, R - 1, S) < S or R == 1  # the full sequence is reached at t = R, not before
    for t in (R, R + 1, 2 * R, 10 * R + 7):
        assert kept_length(c, t, S) == S


def test_kept_length_hand_values_small_case():
    # S 64, r0 16, step 8, R 4: v = floor(t·48/4 + 16) = 16, 28, 40, 52, 64 -> 16, 24, 40, 48, 64
    c = cfg(min_kept=16, schedule_steps=4, step_size=8)
    assert [kept_length(c, t, 64) for t in range(7)] == [16, 24, 40, 48, 64, 64, 64]


@pytest.mark.parametrize("S, r0, R, step", [(64, 16, 4, 8), (128, 32, 10, 16), (2048, 128, 1000, 16),
                                            (100, 16, 9, 16), (256, 17, 50, 5)])
def test_kept_length_monotone_and_multiple_of_step(S, r0, R, step):
    c = cfg(min_kept=r0, schedule_steps=R, step_size=step)
    values = [kept_length(c, t, S) for t in range(3 * R + 2)]
    assert all(a <= b for a, b in zip(values, values[1:])), values
    assert all(1 <= v <= S for v in values)
    # below the end of the schedule every length is a multiple of step_size; from R on it is S
    assert all(v % step == 0 for v in values[:R]), values[:R]
    assert values[R:] == [S] * (len(values) - R)


def test_kept_length_reaches_full_sequence_when_not_a_multiple_of_step():
    # S = 100 is not a multiple of 16: the literal formula would give 96 from t = R on; the
    # schedule instead ends at the full sequence (as the module docstring says).
    c = cfg(min_kept=16, schedule_steps=9, step_size=16)
    assert [kept_length(c, t, 100) for t in range(9)] == [hand_kept(t, 100, 16, 9, 16) for t in range(9)]
    assert kept_length(c, 8, 100) == 80  # v = floor(8/9·84 + 16) = 90 -> 80
    assert hand_kept(9, 100, 16, 9, 16) == 96
    assert [kept_length(c, t, 100) for t in (9, 10, 50)] == [100, 100, 100]


def test_kept_length_constant_schedule():
    c = cfg(min_kept=48, schedule_steps=4, step_size=16, schedule="constant")
    assert {kept_length(c, t, 128) for t in (0, 1, 3, 4, 5, 100)} == {48}


def test_dropping_layers_default_and_explicit():
    assert dropping_layers(cfg(), 4) == [1, 2]
    assert dropping_layers(cfg(), 12) == list(range(1, 11))
    assert dropping_layers(cfg(layers=[5, 0, 3]), 8) == [0, 3, 5]
    assert dropping_layers(cfg(layers=[]), 8) == []


@pytest.mark.parametrize("layers, L, n", [(None, 4, 2), (None, 12, 10), ([0, 3, 5], 8, 3), ([], 8, 0)])
def test_layer_tokens(layers, L, n):
    c = cfg(layers=layers, min_kept=32, schedule_steps=10, step_size=16)
    B, S = 8, 128
    for t in (0, 3, 5, 9, 10, 25):
        r = hand_kept(t, S, 32, 10, 16)
        assert layer_tokens(c, t, B, S, L) == B * (n * r + (L - n) * S), t
    assert layer_tokens(c, 10, B, S, L) == B * L * S  # schedule over: every layer sees every token


def test_layer_tokens_by_hand_small_case():
    # B 8, S 64, L 4 with layers 1 and 2 dropping, r = 16 at step 0: 8·(2·16 + 2·64) = 1280
    c = cfg(min_kept=16, schedule_steps=4, step_size=8)
    assert [layer_tokens(c, t, 8, 64, 4) for t in range(6)] == [1280, 1408, 1664, 1792, 2048, 2048]


def test_step_flops_is_the_baseline_once_the_schedule_ends():
    shape = F.Shape(layers=4, hidden=64, heads=4, groups=2, ffn=192, vocab=256)
    c = cfg(min_kept=16, schedule_steps=4, step_size=8)
    assert step_flops(c, shape, 4, 8, 64) == F.train_step_flops(shape, 8, 64)
    assert step_flops(c, shape, 0, 8, 64) < step_flops(c, shape, 1, 8, 64) < F.train_step_flops(shape, 8, 64)



@pytest.mark.parametrize("steps, schedule", [(3, "fixed_linear"), (4, "fixed_linear"), (11, "fixed_linear"),
                                             (11, "constant")])
def test_plan_shows_the_mean_of_every_step(steps, schedule):
    """`suite plan`'s FLOPs a step for a random-LTD variant: the mean over the run's steps, whether the run ends
    inside the kept-length schedule, with it, or after it (its shortcut must not change the sum)."""
    from suite.scenario import load_scenario
    from suite.tricks.random_ltd import plan_row

    [spec] = load_scenario(UNIT, [f"workload.steps={steps}", f'tricks.random_ltd.schedule="{schedule}"'])
    c, w = spec.tricks["random_ltd"], spec.workload
    shape = F.Shape.of(spec.model)
    every = [step_flops(c, shape, t, w.global_batch, w.seq_length) for t in range(steps)]
    assert plan_row(spec, c)["flops_per_step"] == sum(every) // steps
    assert len(set(every)) == (1 if schedule == "constant" else min(steps, c.schedule_steps + 1))

# --- the single-process worker --------------------------------------------------------------------
# Everything below that imports torch or megatron runs only inside the worker subprocess.

WORKER_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """Runs every check_* in one subprocess; {check name: {"error": str | None, "data": ...}}."""
    return run_worker(__file__, tmp_path_factory.mktemp("random_ltd_worker"), WORKER_TIMEOUT_S)


def _spec(*overrides):
    from suite.scenario import load_scenario

    (v,) = load_scenario(UNIT, list(overrides))
    return v


def _build(spec, layer):
    from suite.models import gpt

    config = gpt.transformer_config(spec)
    (model,) = gpt.build_chunks(spec, config, layer)
    gpt.init_parameters([model], spec.workload.seed, spec.model.init_std, spec.model.num_layers)
    return model


def _batch(spec, step=0):
    import torch

    from suite.data.tokens import TokenSource

    batch = TokenSource(spec).train_batch(step, spec.workload.micro_batch)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return tokens, labels, positions


def _runtime(spec):
    from suite.tricks.random_ltd.layer import RandomLTDRuntime

    return RandomLTDRuntime(spec, spec.tricks["random_ltd"])


def _capture_layer_input(model, layer_index, tokens, positions):
    """(hidden_states, kwargs) that the TransformerBlock passes to decoder.layers[layer_index]."""
    import torch

    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"].detach().clone()
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    handle = model.decoder.layers[layer_index].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(tokens, positions, None)
    handle.remove()
    return seen["hidden"], seen["kwargs"]


def _matmul_attention_class():
    """Core attention with explicit matmuls (FlopCounterMode counts them; it skips CPU SDPA)."""
    import torch

    from megatron.core.transformer.enums import AttnMaskType
    from suite.models.attention import SDPAttention

    class MatmulAttention(SDPAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            assert attention_mask is None and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
            if k.shape[1] != q.shape[1]:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            s, d = q.shape[2], q.shape[3]
            scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(d)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            future = torch.ones(s, s, dtype=torch.bool).triu(1)
            probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
            out = torch.matmul(probs, v)
            return out.permute(2, 0, 1, 3).reshape(s, q.shape[0], -1)

    return MatmulAttention


def check_kept_indices_properties(tmp):
    import torch

    from suite.tricks.random_ltd.layer import DropState, kept_indices

    s, b, r = 64, 3, 24
    state = DropState(seed=1234, layers={1, 2}, step=5, kept=r, sample_offset=4)
    idx = kept_indices(state, 1, b, s)
    assert idx.shape == (b, r) and idx.dtype == torch.int64
    for row in idx.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < s  # sorted, distinct, in range
    # a pure function of (seed, step, layer, sample offset): the global RNG plays no part
    torch.manual_seed(0)
    a = kept_indices(state, 1, b, s)
    torch.manual_seed(1)
    torch.rand(100)
    assert torch.equal(a, kept_indices(state, 1, b, s)) and torch.equal(a, idx)
    others = [kept_indices(state, 2, b, s),
              kept_indices(dataclasses.replace(state, step=6), 1, b, s),
              kept_indices(dataclasses.replace(state, sample_offset=6), 1, b, s),
              kept_indices(dataclasses.replace(state, seed=1235), 1, b, s)]
    for other in others:
        assert not torch.equal(other, idx)
    # independent per sample within a micro-batch
    assert len({tuple(row) for row in idx.tolist()}) == b


def check_large_seed(tmp):
    from suite.tricks.random_ltd.layer import DropState, kept_indices

    # a date-like seed (any workload.seed above ~182,000 overflows the generator seed)
    kept_indices(DropState(seed=20250101, layers={1}, step=3, kept=16, sample_offset=2), 1, 2, 64)


def check_kept_equals_sequence_is_the_unwrapped_model(tmp):
    """kept = S: logits and gradients bitwise equal to the model built from gpt.layer_spec()."""
    import torch

    from megatron.core.transformer.transformer_layer import TransformerLayer
    from suite.models import gpt
    from suite.tricks.random_ltd.layer import RandomLTDLayer

    spec = _spec()
    S, R = spec.workload.seq_length, spec.tricks["random_ltd"].schedule_steps
    runtime = _runtime(spec)
    wrapped = _build(spec, runtime.layer_spec(gpt.layer_spec()))
    plain = _build(spec, gpt.layer_spec())
    assert [type(layer) for layer in wrapped.decoder.layers] == [RandomLTDLayer] * 4
    assert [type(layer) for layer in plain.decoder.layers] == [TransformerLayer] * 4
    tokens, labels, positions = _batch(spec)
    runtime.begin_step(R)
    runtime.begin_microbatch(0)
    assert runtime.state.kept == S

    def forward_backward(model):
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(tokens, positions, None)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1))
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits_w, grads_w = forward_backward(wrapped)
    logits_p, grads_p = forward_backward(plain)
    assert torch.equal(logits_w, logits_p)
    assert grads_w.keys() == grads_p.keys() and len(grads_w) > 0
    for name in grads_w:
        assert torch.equal(grads_w[name], grads_p[name]), name
    # not vacuous: with kept < S the same wrapped model computes another function in train mode ...
    runtime.begin_step(0)
    runtime.begin_microbatch(0)
    assert runtime.state.kept < S
    wrapped.train()
    with torch.no_grad():
        dropped = wrapped(tokens, positions, None)
    assert not torch.allclose(dropped, logits_p, atol=1e-4)
    # ... and in eval mode it runs every token whatever the kept length
    wrapped.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(tokens, positions, None), plain(tokens, positions, None))
    return {"max_logit_change_when_dropping": float((dropped - logits_p).abs().max())}


def check_layer_against_references(tmp):
    """One dropping layer (kept < S) against references computed outside RandomLTDLayer."""
    import torch

    from megatron.core.transformer.transformer_layer import TransformerLayer
    from suite.models import gpt
    from suite.tricks.random_ltd.layer import kept_indices

    spec = _spec()
    runtime = _runtime(spec)
    model = _build(spec, runtime.layer_spec(gpt.layer_spec()))
    tokens, labels, positions = _batch(spec)
    runtime.begin_step(1)
    runtime.begin_microbatch(6)  # as if this micro-batch started at sample 6 of the global batch
    state = runtime.state
    s, b = tokens.shape[1], tokens.shape[0]
    r = state.kept
    assert 0 < r < s and r == kept_length(spec.tricks["random_ltd"], 1, s)
    model.train()
    layer_id = 1
    layer = model.decoder.layers[layer_id]
    assert layer.layer_number - 1 == layer_id and layer_id in state.layers
    h, kw = _capture_layer_input(model, layer_id, tokens, positions)
    assert kw.get("attention_mask") is None
    rope_full = model.rotary_pos_emb(s)  # [s, 1, 1, d]
    assert rope_full.shape[:3] == (s, 1, 1) and torch.equal(kw["rotary_pos_emb"], rope_full)
    # Sharper attention than the 0.02-std init gives (nearly uniform there, so positions would
    # hardly matter): the RoPE check below must see a clear difference, not rounding noise.
    with torch.no_grad():
        layer.self_attention.linear_qkv.weight.mul_(8.0)

    h_in = h.clone().requires_grad_(True)
    out, _ = layer(hidden_states=h_in, **kw)
    assert out.shape == h.shape
    assert torch.equal(h_in.detach(), h)  # the input is not modified in place

    idx = kept_indices(state, layer_id, b, s)  # [b, r], the layer's own draw
    keep = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        keep[i, idx[i]] = True

    with torch.no_grad():
        # (a) gather by hand, the unwrapped megatron layer on the kept tokens with RoPE taken at the
        # ORIGINAL positions (causal among kept tokens), scatter into a copy of the input
        kept_h = torch.stack([h[idx[i], i] for i in range(b)], dim=1)  # [r, b, hidden]
        rope_kept = torch.stack([rope_full[idx[i], 0] for i in range(b)], dim=1)  # [r, b, 1, d]
        kept_out, _ = TransformerLayer.forward(layer, hidden_states=kept_h,
                                               **{**kw, "rotary_pos_emb": rope_kept})
        ref_a = h.clone()
        for i in range(b):
            ref_a[idx[i], i] = kept_out[:, i]

        # (b) no gather at all: the full sequence through the unwrapped layer with the full RoPE and
        # an explicit boolean mask from original positions, query i sees key j iff j is kept and
        # pos_j <= pos_i (dropped queries see themselves only, to keep their rows finite; discarded)
        pos = torch.arange(s)
        allowed = keep[:, None, :] & (pos[None, None, :] <= pos[None, :, None])  # [b, s(query), s(key)]
        allowed |= torch.eye(s, dtype=torch.bool)[None]
        full_out, _ = TransformerLayer.forward(layer, hidden_states=h,
                                               **{**kw, "attention_mask": ~allowed[:, None]})
        ref_b = torch.where(keep.t()[:, :, None], full_out, h)

        # (c) the naive bug: RoPE at positions 0..r-1 instead of the kept tokens' positions
        naive_out, _ = TransformerLayer.forward(layer, hidden_states=kept_h,
                                                **{**kw, "rotary_pos_emb": rope_full[:r]})
        naive = h.clone()
        for i in range(b):
            naive[idx[i], i] = naive_out[:, i]

    out_d = out.detach()
    diff_a = float((out_d - ref_a).abs().max())
    diff_b = float((out_d - ref_b).abs().max())
    diff_naive = float((out_d - naive).abs().max())
    assert torch.equal(out_d, ref_a), f"gather/scatter reference differs by {diff_a}"
    assert torch.allclose(out_d, ref_b, rtol=1e-5, atol=1e-5), f"explicit-mask reference differs by {diff_b}"
    assert diff_naive > 1e-2 and diff_naive > 1000 * diff_b, \
        f"RoPE at positions 0..r-1 gives nearly the same output ({diff_naive}; reference noise {diff_b})"
    assert not torch.allclose(naive, ref_b, rtol=1e-3, atol=1e-3)

    # dropped positions skip the layer bitwise, forward and backward
    dropped = ~keep.t()  # [s, b]
    assert int(dropped.sum()) == b * (s - r)
    assert torch.equal(out_d[dropped], h[dropped])
    assert not torch.allclose(out_d[~dropped], h[~dropped])
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    out.backward(upstream)
    assert torch.equal(h_in.grad[dropped], upstream[dropped])

    # eval mode runs every token: the unwrapped layer on the whole sequence
    layer.eval()
    with torch.no_grad():
        out_eval, _ = layer(hidden_states=h, **kw)
        ref_eval, _ = TransformerLayer.forward(layer, hidden_states=h, **kw)
    assert torch.equal(out_eval, ref_eval)
    assert not torch.allclose(out_eval, out_d, atol=1e-4)
    # a layer outside the dropping set runs every token in train mode too
    first = model.decoder.layers[0]
    first.train()
    h0, kw0 = _capture_layer_input(model, 0, tokens, positions)
    with torch.no_grad():
        assert torch.equal(first(hidden_states=h0, **kw0)[0],
                           TransformerLayer.forward(first, hidden_states=h0, **kw0)[0])
    return {"kept": r, "diff_gather_reference": diff_a, "diff_explicit_mask_reference": diff_b,
            "diff_naive_rope": diff_naive}


def check_restricted_causal_attention(tmp):
    """Explicit mask from original positions (pos_i >= pos_j, both kept) == is_causal on the sorted
    gathered sequence."""
    import torch
    import torch.nn.functional as Fn

    from suite.tricks.random_ltd.layer import DropState, kept_indices

    gen = torch.Generator().manual_seed(7)
    b, n, s, d, r = 3, 4, 64, 16, 24
    q, k, v = (torch.randn(b, n, s, d, generator=gen) for _ in range(3))
    idx = kept_indices(DropState(seed=99, layers={1}, step=2, kept=r, sample_offset=0), 1, b, s)
    worst = 0.0
    for i in range(b):
        p = idx[i]
        mask = p[:, None] >= p[None, :]  # [r, r] from the ORIGINAL positions
        explicit = Fn.scaled_dot_product_attention(q[i:i + 1, :, p], k[i:i + 1, :, p], v[i:i + 1, :, p],
                                                   attn_mask=mask)
        causal = Fn.scaled_dot_product_attention(q[i:i + 1, :, p], k[i:i + 1, :, p], v[i:i + 1, :, p],
                                                 is_causal=True)
        # and by hand, from the full sequence: keys restricted to kept positions <= the query's
        scores = (q[i][:, p] @ k[i].transpose(-1, -2)) / math.sqrt(d)  # [n, r, s]
        key_ok = torch.zeros(s, dtype=torch.bool)
        key_ok[p] = True
        full_mask = key_ok[None, :] & (torch.arange(s)[None, :] <= p[:, None])  # [r, s]
        by_hand = scores.masked_fill(~full_mask, float("-inf")).softmax(-1) @ v[i]
        assert torch.allclose(explicit, causal, rtol=1e-5, atol=1e-6)
        assert torch.allclose(by_hand[None], causal, rtol=1e-5, atol=1e-6)
        worst = max(worst, float((explicit - causal).abs().max()), float((by_hand[None] - causal).abs().max()))
        # is_causal on UNSORTED kept tokens would be wrong: the check can tell
        perm = p.flip(0)
        wrong = Fn.scaled_dot_product_attention(q[i:i + 1, :, perm], k[i:i + 1, :, perm], v[i:i + 1, :, perm],
                                                is_causal=True).flip(2)
        assert not torch.allclose(wrong, causal, atol=1e-3)
    return {"max_diff": worst}


def check_flops(tmp):
    """step_flops vs FlopCounterMode, forward + backward of the loss, at several kept lengths."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from suite.models import gpt

    spec = _spec()
    S, B = spec.workload.seq_length, spec.workload.global_batch
    assert spec.workload.micro_batch == B  # one micro-batch is the whole step
    shape = F.Shape.of(spec.model)
    base_cfg = spec.tricks["random_ltd"]
    runtime = _runtime(spec)
    tokens, labels, positions = _batch(spec)

    matmul_layer = gpt.layer_spec()
    matmul_layer.submodules.self_attention.submodules.core_attention = _matmul_attention_class()
    model_mm = _build(spec, runtime.layer_spec(matmul_layer))
    model_sdpa = _build(spec, runtime.layer_spec(gpt.layer_spec()))

    def counted(model, r):
        fixed = dataclasses.replace(base_cfg, schedule="constant", min_kept=r)
        runtime.state.kept = kept_length(fixed, 0, S)
        runtime.begin_microbatch(0)
        model.train()
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as fc:
            loss = model(tokens, positions, None, labels=labels).float().mean()
            loss.backward()
        ops = {str(op): int(n) for op, n in fc.get_flop_counts()["Global"].items()}
        return fc.get_total_flops(), ops, step_flops(fixed, shape, 0, B, S)

    # the explicit-matmul attention computes the same function as SDPAttention
    runtime.state.kept = S
    model_mm.eval()
    model_sdpa.eval()
    with torch.no_grad():
        a, b = model_mm(tokens, positions, None), model_sdpa(tokens, positions, None)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), float((a - b).abs().max())

    rows = []
    n = len(dropping_layers(base_cfg, shape.layers))
    for r in (16, 32, 48, 64):
        total_mm, ops_mm, analytic = counted(model_mm, r)
        total_sdpa, ops_sdpa, _ = counted(model_sdpa, r)
        attention = 3 * (n * 4 * B * r * r * shape.hidden + (shape.layers - n) * 4 * B * S * S * shape.hidden)
        rows.append({"r": r, "analytic": analytic, "counted_matmul_attention": total_mm,
                     "counted_sdpa": total_sdpa, "analytic_attention": attention,
                     "ops_matmul_attention": ops_mm, "ops_sdpa": ops_sdpa})
    return {"rows": rows, "B": B, "S": S}


def check_trainer_lr(tmp):
    """The LR the real Trainer applies at every step, for a few schedules (data for the hand check)."""
    from suite.launch.spmd import RankContext
    from suite.workloads.train import Trainer

    cases = {
        "cosine_layer_tokens": ["workload.global_batch=8", "workload.lr_schedule=cosine"],
        "linear_layer_tokens": ["workload.global_batch=8", "workload.lr_schedule=linear",
                                "tricks.random_ltd.layers=[0, 2]"],
        "cosine_steps": ["workload.global_batch=8", "tricks.random_ltd.layer_token_lr=false"],
        "no_warmup": ["workload.global_batch=8", "workload.lr_warmup_steps=0"],
    }
    out = {}
    for name, overrides in cases.items():
        spec = _spec(*overrides)
        trainer = Trainer(spec, RankContext(rank=0, world=1, local_rank=0))
        lrs = [trainer.current_lr()]
        losses = []
        for step in range(spec.workload.steps):
            losses.append(float(trainer.train_step(step)))
            lrs.append(trainer.current_lr())
        w, t = spec.workload, spec.tricks["random_ltd"]
        out[name] = {"lrs": lrs, "losses": losses, "steps": w.steps, "B": w.global_batch, "S": w.seq_length,
                     "L": spec.model.num_layers, "lr": w.lr, "min_lr": w.min_lr, "schedule": w.lr_schedule,
                     "warmup": w.lr_warmup_steps, "cfg": dataclasses.asdict(t),
                     "param_group_lrs": sorted({g["lr"] for g in trainer.optimizer.param_groups})}
    return out


def check_trainer_draws_per_micro_batch(tmp):
    """Through the real Trainer: every dropping layer of every micro-batch draws with that
    micro-batch's first global sample, the current step and kept length (B 8, micro-batch 2)."""
    import torch

    from suite.launch.spmd import RankContext
    from suite.tricks.random_ltd.layer import RandomLTDLayer, kept_indices
    from suite.workloads.train import Trainer

    spec = _spec("workload.global_batch=8", "workload.steps=3")
    trainer = Trainer(spec, RankContext(rank=0, world=1, local_rank=0))
    (runtime,) = trainer.tricks
    seen = []

    def hook(module, args, kwargs):
        st = module.drop_state
        if module.training:
            seen.append((st.step, st.kept, st.sample_offset, module.layer_number - 1,
                         kept_indices(st, module.layer_number - 1, kwargs["hidden_states"].shape[1],
                                      kwargs["hidden_states"].shape[0]).tolist()))

    layers = [m for m in trainer.model[0].modules() if isinstance(m, RandomLTDLayer)]
    assert len(layers) == 4 and all(m.drop_state is runtime.state for m in layers)
    for m in layers:
        m.register_forward_pre_hook(hook, with_kwargs=True)
    for step in range(3):
        trainer.train_step(step)
    c = spec.tricks["random_ltd"]
    want = [(t, kept_length(c, t, 64), off, layer) for t in range(3) for off in (0, 2, 4, 6)
            for layer in range(4)]
    assert [x[:4] for x in seen] == want
    draws = [json.dumps(x[4]) for x in seen if x[3] in (1, 2)]
    assert len(set(draws)) == len(draws)  # no two (step, micro-batch, layer) share indices
    return {"calls": len(seen)}


CHECKS = [check_kept_indices_properties, check_large_seed, check_kept_equals_sequence_is_the_unwrapped_model,
          check_layer_against_references, check_restricted_causal_attention, check_flops, check_trainer_lr,
          check_trainer_draws_per_micro_batch]


# --- 2. LR schedule by layer-tokens ---------------------------------------------------------------

def hand_lrs(case: dict) -> list[float]:
    """Megatron's OptimizerParamScheduler by hand: init_lr 0, stepped after each optimizer step by
    the tokens the step consumed (layer-tokens / L, or B·S without layer_token_lr)."""
    B, S, L, steps, warmup = case["B"], case["S"], case["L"], case["steps"], case["warmup"]
    c = cfg(**case["cfg"])
    W = warmup * B * S  # warm-up tokens
    D = max(steps, warmup + 1) * B * S  # decay tokens
    lr_max, lr_min = case["lr"], case["min_lr"]

    def lr(T):
        if W > 0 and T <= W:
            return lr_max * T / W
        if case["schedule"] == "constant":
            return lr_max
        if T > D:
            return lr_min
        ratio = (T - W) / (D - W)
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0) if case["schedule"] == "cosine" else 1.0 - ratio
        return lr_min + coeff * (lr_max - lr_min)

    n = len(dropping_layers(c, L))
    T, out = 0.0, [lr(0.0)]
    for t in range(steps):
        r = hand_kept(t, S, c.min_kept, c.schedule_steps, c.step_size)
        T += B * (n * r + (L - n) * S) / L if c.layer_token_lr else B * S
        out.append(lr(T))
    return out


def assert_lrs_close(got, want, rel=1e-12):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == pytest.approx(w, rel=rel, abs=0.0), f"step {i}: trainer lr {g!r}, hand {w!r}"


@pytest.mark.parametrize("case", ["cosine_layer_tokens", "linear_layer_tokens", "cosine_steps", "no_warmup"])
def test_trainer_lr_follows_layer_token_schedule(worker, case):
    """Tolerance: 1e-12 relative (the two sides add the same float increments)."""
    data = result(worker, "trainer_lr")[case]
    assert data["lrs"][0] == (0.0 if data["warmup"] else data["lr"])
    assert_lrs_close(data["lrs"], hand_lrs(data))
    assert len(data["param_group_lrs"]) == 1  # every parameter group follows the same schedule
    assert all(math.isfinite(x) for x in data["losses"])


def test_layer_token_lr_decays_slower_than_the_step_schedule(worker):
    data = result(worker, "trainer_lr")
    ltd, steps = data["cosine_layer_tokens"], data["cosine_steps"]
    warm = ltd["warmup"]
    # fewer tokens per step while r_t < S: a slower warm-up, then a higher LR in the decay
    assert ltd["lrs"][1] < steps["lrs"][1]
    assert ltd["lrs"][-1] > steps["lrs"][-1]
    assert steps["lrs"][warm] == pytest.approx(steps["lr"], rel=1e-12)


# --- 3./4. the dropping layer ---------------------------------------------------------------------

def test_kept_indices_properties(worker):
    result(worker, "kept_indices_properties")


def test_trainer_draws_per_micro_batch(worker):
    assert result(worker, "trainer_draws_per_micro_batch")["calls"] == 3 * 4 * 4


def test_kept_indices_accept_large_seeds(worker):
    result(worker, "large_seed")


def test_kept_equal_to_sequence_is_the_unwrapped_model(worker):
    data = result(worker, "kept_equals_sequence_is_the_unwrapped_model")
    assert data["max_logit_change_when_dropping"] > 1e-4


def test_dropping_layer_matches_hand_references(worker):
    data = result(worker, "layer_against_references")
    assert data["diff_gather_reference"] == 0.0
    assert data["diff_explicit_mask_reference"] < 1e-5
    assert data["diff_naive_rope"] > 1e-2


def test_restricted_causal_attention_is_is_causal_on_sorted_kept_tokens(worker):
    assert result(worker, "restricted_causal_attention")["max_diff"] < 1e-5


# --- 6. FLOPs -------------------------------------------------------------------------------------

def test_step_flops_match_flop_counter(worker):
    data = result(worker, "flops")
    for row in data["rows"]:
        rel = abs(row["counted_matmul_attention"] - row["analytic"]) / row["analytic"]
        assert rel < 0.02, row
        # FlopCounterMode does not count CPU SDPA: the SDPA model is short by exactly the attention
        # matmuls (or, with a newer torch that counts it, matches like the explicit one)
        short = row["analytic"] - row["counted_sdpa"]
        assert short == pytest.approx(row["analytic_attention"], rel=0.02) or \
            abs(row["counted_sdpa"] - row["analytic"]) / row["analytic"] < 0.02, row
    counts = [row["counted_matmul_attention"] for row in data["rows"]]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    print("\nFLOPs (B={B}, S={S}):".format(**data))
    for row in data["rows"]:
        print(f"  r={row['r']}: analytic {row['analytic']:,}  FlopCounterMode explicit-matmul attention "
              f"{row['counted_matmul_attention']:,}  with SDPA {row['counted_sdpa']:,}  "
              f"(analytic attention {row['analytic_attention']:,})")


# --- 5. indices identical across a TP group and across layouts (2 processes) ----------------------

TP_SCRIPT = r'''
import json, sys
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from suite.launch import cpu_compat
from suite.tricks.random_ltd.layer import DropState, kept_indices

cpu_compat.enable()
dist.init_process_group("gloo")
ps.initialize_model_parallel(tensor_model_parallel_size=2)
rank = dist.get_rank()
torch.manual_seed(1000 + rank)  # different global RNG state per rank, as megatron's TP ranks have
torch.rand(17 * (rank + 1))
out = {}
for step, layer, offset, kept in [(0, 1, 0, 16), (3, 2, 4, 40), (7, 1, 6, 24)]:
    state = DropState(seed=1234, layers={1, 2}, step=step, kept=kept, sample_offset=offset)
    idx = kept_indices(state, layer, 2, 64)
    gathered = [torch.empty_like(idx) for _ in range(2)]
    dist.all_gather(gathered, idx, group=ps.get_tensor_model_parallel_group())
    out[f"{step}/{layer}/{offset}"] = [g.tolist() for g in gathered]
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"tp_world": ps.get_tensor_model_parallel_world_size(), "draws": out}, f)
ps.destroy_model_parallel()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_tp_group_ranks_draw_the_same_indices(tmp_path):
    script = tmp_path / "tp_draw.py"
    script.write_text(TP_SCRIPT)
    out = tmp_path / "draws.json"
    r = torchrun(str(script), str(out))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    data = json.loads(out.read_text())
    assert data["tp_world"] == 2
    for key, (rank0, rank1) in data["draws"].items():
        assert rank0 == rank1, key
        assert all(row == sorted(set(row)) for row in rank0)
    assert len({json.dumps(v[0]) for v in data["draws"].values()}) == len(data["draws"])


@pytest.fixture(scope="module")
def layout_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("random_ltd_layouts")
    r = torchrun("-m", "suite", "run", str(LAYOUTS), "--out", str(out))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return {rec["variant"]: rec for rec in records}


@pytest.mark.slow
def test_layouts_train_the_same_function(layout_records):
    assert set(layout_records) == {"dp", "tp2", "pp2"}
    for name, rec in layout_records.items():
        assert rec["status"] == "ok", rec.get("error")
    assert [(layout_records[v]["tp"], layout_records[v]["pp"], layout_records[v]["dp"])
            for v in ("dp", "tp2", "pp2")] == [(1, 1, 2), (2, 1, 1), (1, 2, 1)]
    curves = {v: [x for _, x in rec["metrics"]["loss_curve"]] for v, rec in layout_records.items()}
    base = curves["dp"]
    assert len(base) == 6 and all(math.isfinite(x) for x in base)
    for v in ("tp2", "pp2"):
        for step, (a, b) in enumerate(zip(base, curves[v]), start=1):
            assert b == pytest.approx(a, rel=1e-5), f"{v} step {step}: {b} vs dp {a}"
    vals = {v: rec["metrics"]["validation_loss"] for v, rec in layout_records.items()}
    for v in ("tp2", "pp2"):
        assert vals[v] == pytest.approx(vals["dp"], rel=1e-5)


@pytest.mark.slow
def test_layout_records_hold_the_hand_schedule(layout_records):
    from suite.scenario import load_scenario

    spec = load_scenario(LAYOUTS, only=["dp"])[0]
    c, w, L = spec.tricks["random_ltd"], spec.workload, spec.model.num_layers
    S, B = w.seq_length, w.global_batch
    hand = [hand_kept(t, S, c.min_kept, c.schedule_steps, c.step_size) for t in range(w.steps)]
    assert hand == [16, 24, 40, 48, 64, 64]
    changes = [[t, r] for t, r in enumerate(hand) if t == 0 or hand[t - 1] != r]
    for v, rec in layout_records.items():
        extra = rec["metrics"]["extra"]["random_ltd"]
        assert extra["kept_length_schedule"] == changes, v
        assert extra["dropping_layers"] == [1, 2], v
        assert extra["layer_tokens"] == sum(B * (2 * r + 2 * S) for r in hand), v
        # flops: the sum of the per-step random-LTD FLOPs, and the last step's (r = S) is the baseline
        m = rec["metrics"]
        shape = F.Shape.of(spec.model)
        assert m["flops_total"] == sum(step_flops(c, shape, t, B, S) for t in range(w.steps)), v
        assert m["flops_per_step"] == F.train_step_flops(shape, B, S), v


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3]))


def test_gather_scatter_match_torch_gather_and_pass_gradcheck():
    """The copy-backward gather/scatter equal torch.gather/scatter and have exact gradients."""
    import torch

    from suite.tricks.random_ltd.layer import gather_tokens, scatter_tokens

    gen = torch.Generator().manual_seed(0)
    s, b, h, r = 16, 3, 5, 7
    x = torch.randn(s, b, h, dtype=torch.float64, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(s, generator=gen)[:r].sort().values for _ in range(b)])
    index = idx.t().unsqueeze(-1).expand(-1, -1, h)
    kept, rows = gather_tokens(x, idx)
    assert torch.equal(kept, x.gather(0, index))
    assert torch.equal(scatter_tokens(x, rows, kept * 3), x.scatter(0, index, x.gather(0, index) * 3))

    def f(t):
        k, rws = gather_tokens(t, idx)
        return scatter_tokens(t, rws, k.sin() * 2)

    assert torch.autograd.gradcheck(f, (x,))
