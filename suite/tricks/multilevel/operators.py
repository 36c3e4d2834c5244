"""Coalescing, de-coalescing and interpolation of a GPT model's parameters.

Plain functions over *full* (unsharded) fp32 tensors keyed by megatron-core's global parameter names
(``suite.models.gpt.global_names``); ``state.py`` gathers and scatters them under TP and PP.

Width (factor k). Each resized axis is read as k blocks: small unit j merges large units j, j + s,
…, j + (k−1)·s (s = small size), the authors' default map F = norm([I I …]). The unit is a hidden
channel, a whole attention head (head size kept, so RoPE and the softmax scale are unchanged), a
query group, or a SwiGLU unit. Because megatron orders QKV rows group-major ([q…q k v] per query
group) and a group's heads follow it, block pairing of heads and of groups agree: copy e of small
head j lies in copy e of its small group, so GQA stays consistent. For a linear map W (out × in),
with F (small × large) averaging and T = norm(Fᵀ) copying:

    coalesce    W_s = F_out · W · norm(F_inᵀ)    output units averaged, input units summed
    de-coalesce W_l = T_out · W_s · norm(T_inᵀ)  output units copied,   input units divided by k

Every axis of hidden size is the *output* of the map that writes it (embedding table columns,
attention and MLP output projections, norm weights: averaged / copied) or the *input* of one that
reads it (QKV, SwiGLU fc1, output layer columns: summed / divided). Megatron's fc1 rows are
[gate; up]: each half is resized on its own.

Why this preserves the small model's function exactly (up to float rounding) under de-coalescing:
if the residual stream is x_l = dup(x_s) (each of the k copies equal to x_s), then
RMSNorm(x_l) = dup(x_s) / rms(dup(x_s)) · dup(w_s) = dup(RMSNorm(x_s)), since rms(dup(x)) = rms(x)
(ε included); a linear layer maps dup(n) to Σ_e W_s/k · n = dup(W_s·n); each large head computes
its small head's attention on copied q, k, v; SiLU(gate)·up of copies is the copy. So every
sub-layer adds dup(Δ_s) and the stream stays dup(x_s). The embedding therefore copies its columns
*unscaled* (the authors' ×0.5 for GPT-2 breaks this: the residual stream would be ½·dup(x_s) while
the sub-layers still add dup(Δ_s)), and the output layer, reading the final norm's dup(n), gets
W_out/k per copy: logits Σ_e (W_out/k)·n = W_out·n. Coalescing a de-coalesced model returns it
bitwise for factor 2 (the mean of two equal floats and the sum of two halves are exact), and to
float rounding for other factors.

Depth (factor k): small layer i = the mean of large layers k·i … k·i + k − 1 (the paper's adjacent
pairing; the authors' shipped GPT-2 config pairs i with i + 6 instead, a stacking); de-coalescing
copies small layer i into those k layers. Norm weights follow the same rules as every tensor.

Interpolation: θ ← (1 − α)·θ_large + α·D(θ_small), exactly θ_large at α = 0 and D(θ_small) at 1.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

OUT, IN = "out", "in"

# Global-name suffix -> resized axes as (dim, role, parts): role OUT averages / copies, IN sums /
# divides; ``parts`` > 1 splits the axis into independent parts first (fc1's [gate; up]).
WIDTH_AXES = [
    ("embedding.word_embeddings.weight", [(1, OUT, 1)]),  # [vocab, h]
    ("output_layer.weight", [(1, IN, 1)]),  # [vocab, h]
    ("layernorm.weight", [(0, OUT, 1)]),  # input_, pre_mlp_, final_layernorm: [h]
    ("self_attention.linear_qkv.weight", [(0, OUT, 1), (1, IN, 1)]),  # [groups·(q/g + 2)·d, h]
    ("self_attention.linear_proj.weight", [(0, OUT, 1), (1, IN, 1)]),  # [h, heads·d]
    ("mlp.linear_fc1.weight", [(0, OUT, 2), (1, IN, 1)]),  # [gate; up] = [2·ffn, h]
    ("mlp.linear_fc2.weight", [(0, OUT, 1), (1, IN, 1)]),  # [h, ffn]
]
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def width_axes(name: str) -> list[tuple[int, str, int]]:
    for suffix, axes in WIDTH_AXES:
        if name.endswith(suffix):
            return axes
    raise KeyError(f"multilevel has no width rule for parameter '{name}'")


def _blocks(x: torch.Tensor, dim: int, parts: int, k: int) -> torch.Tensor:
    """``dim`` viewed as [parts, k, n / (parts·k)]: the k copies of each unit on the middle axis."""
    n = x.shape[dim]
    return x.reshape(*x.shape[:dim], parts, k, n // (parts * k), *x.shape[dim + 1:])


def _coalesce_axis(x, dim, role, parts, k):
    merged = _blocks(x, dim, parts, k)
    merged = merged.mean(dim + 1) if role == OUT else merged.sum(dim + 1)
    return merged.reshape(*x.shape[:dim], x.shape[dim] // k, *x.shape[dim + 1:])


def _decoalesce_axis(x, dim, role, parts, k):
    copies = _blocks(x, dim, parts, 1)
    repeats = [1] * copies.dim()
    repeats[dim + 1] = k
    copies = copies.repeat(repeats)
    if role == IN:
        copies = copies / k
    return copies.reshape(*x.shape[:dim], x.shape[dim] * k, *x.shape[dim + 1:])


def _width(state: dict, k: int, axis_op) -> dict:
    if k == 1:
        return dict(state)
    out = {}
    for name, x in state.items():
        for dim, role, parts in width_axes(name):
            x = axis_op(x, dim, role, parts, k)
        out[name] = x
    return out


def coalesce_width(state: dict, k: int) -> dict:
    return _width(state, k, _coalesce_axis)


def decoalesce_width(state: dict, k: int) -> dict:
    return _width(state, k, _decoalesce_axis)


def coalesce_depth(state: dict, k: int) -> dict:
    """Small layer i = mean of large layers k·i … k·i + k − 1; other parameters unchanged."""
    out, groups = {}, defaultdict(list)
    for name, x in state.items():
        m = _LAYER.fullmatch(name)
        if m is None:
            out[name] = x
        else:
            groups[(int(m[1]) // k, m[2])].append(x)
    for (i, rest), xs in sorted(groups.items()):
        if len(xs) != k:
            raise ValueError(f"layer count is not divisible by the depth factor {k}")
        out[f"decoder.layers.{i}.{rest}"] = torch.stack(xs).mean(0)
    return out


def copy_layers(state: dict, targets) -> dict:
    """Layer i's parameters copied to every layer number in ``targets(i)``; other parameters (embedding,
    final norm, output layer) unchanged. Depth de-coalescing and depth stacking are two such maps."""
    out = {}
    for name, x in state.items():
        m = _LAYER.fullmatch(name)
        if m is None:
            out[name] = x
            continue
        for t in targets(int(m[1])):
            out[f"decoder.layers.{t}.{m[2]}"] = x.clone()
    return out


def decoalesce_depth(state: dict, k: int) -> dict:
    """Large layers k·i … k·i + k − 1 = copies of small layer i; other parameters unchanged."""
    return copy_layers(state, lambda i: range(k * i, k * i + k))


def coalesce(state: dict, width: int, depth: int) -> dict:
    """C: a level's parameters -> the next smaller level's."""
    return coalesce_width(coalesce_depth(state, depth), width)


def decoalesce(state: dict, width: int, depth: int) -> dict:
    """D: a level's parameters -> the next larger level's (C(D(θ)) = θ)."""
    return decoalesce_depth(decoalesce_width(state, width), depth)


def interpolate(large: dict, small_up: dict, alpha: float) -> dict:
    """(1 − α)·θ_large + α·D(θ_small), parameter by parameter."""
    if large.keys() != small_up.keys():
        raise ValueError(f"parameter names differ: {sorted(large.keys() ^ small_up.keys())[:4]}")
    out = {}
    for name, x in large.items():
        if x.shape != small_up[name].shape:
            raise ValueError(f"{name}: shape {tuple(x.shape)} vs {tuple(small_up[name].shape)}")
        out[name] = (1 - alpha) * x + alpha * small_up[name]
    return out
