"""Mixture-of-Depths (Raposo et al., 2024, arXiv 2404.02258): a learned router picks which tokens a block
processes.

In each *routed* layer (default: every other layer, ids 1, 3, 5, ..., as the paper) a router, one linear
map h -> 1 with no bias, scores every token of the layer's input. Each sequence's top k = floor(capacity·S)
tokens go through the layer (attention among them, causal in their original order, RoPE at their original
positions, then the MLP); the others skip it through the residual stream unchanged. The block's update of
a processed token is scaled by its router weight r, x ← x + r·(layer(x) − x), which is what gives the
router a gradient: the top-k selection itself is not differentiable. ``router_scale`` picks r:

* ``"linear"``: the paper's raw router output r = w·x. With megatron's normal(0, init_std) init, r is
  ~1e-2 at the start, so routed layers begin nearly switched off;
* ``"sigmoid"`` (default): r = sigmoid(w·x), about 0.5 at the start (a common choice in public
  re-implementations; the ranking is the same as with the raw score);
* ``"none"``: r = 1. The router then gets no gradient from the loss and keeps its initial weights
  (a fixed, input-dependent selection); it is the setting in which capacity 1.0 *is* the dense model.

What equals the dense model: at capacity 1.0 with ``router_scale = "none"`` every token is selected in
its own order, so the routed layer computes exactly the plain megatron-core layer (logits and gradients
of the shared parameters equal; tested). With ``"linear"`` or ``"sigmoid"`` the function differs even at
capacity 1.0 (each update is scaled by r ≠ 1).

Causality. Attention among the selected tokens is causal (sorted positions, the top-left block of the
causal mask), so, for a fixed selection, no token reads a later one through attention. The *selection*
is not causal: top-k over the whole sequence compares a token's score with later tokens' scores, so
whether token i is processed depends on the future. That is the paper's training (and teacher-forced
validation) setting, and the validation loss and held-out metrics of a Mixture-of-Depths record are measured
the same way, so they carry that look-ahead (at most one bit per token and routed layer: processed or not);
autoregressive decoding needs the paper's causal predictor (an auxiliary router or
a per-token threshold), which is not implemented: the layer refuses a KV-cache (inference) forward.

FLOPs per step (``step_flops``): routed layers at k tokens (attention k²), the others at S, the routers'
2·B·S·h each, the LM head at S, all times 3 for forward + backward. The router's multiply and the gather
and scatter are O(B·S·h) element-wise and not counted, as norms are not.

This module is torch-free (config, FLOPs, validation); ``layer.py`` holds the megatron-core layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from suite import errors, registry
from suite.fields import doc
from suite.metrics import flops as F
from suite.registry import Trick, register

KEY = "tricks.mixture_of_depths."


@dataclass
class MixtureOfDepthsConfig:
    """[tricks.mixture_of_depths]"""

    capacity: float = doc("Fraction of each sequence's tokens a routed layer processes (k = floor(capacity x "
                          "seq_length)); the paper's best is 0.125.", 0.125, range="(0, 1]")
    layers: list[int] | None = doc("0-based ids of the routed layers (default: every other layer, 1, 3, 5, ...).",
                                   range="[0, 4095]")
    router_scale: str = doc("Router weight r scaling a processed token's update x + r * (layer(x) - x): "
                            "'linear' (the paper's raw score), 'sigmoid' (its sigmoid) or 'none' (r = 1: the "
                            "router learns nothing; with capacity 1 the dense model).", "sigmoid",
                            choices=("sigmoid", "linear", "none"))


def routed_layers(cfg: MixtureOfDepthsConfig, num_layers: int) -> list[int]:
    return list(range(1, num_layers, 2)) if cfg.layers is None else sorted(cfg.layers)


def kept_tokens(cfg: MixtureOfDepthsConfig, seq: int) -> int:
    """k: tokens per sequence a routed layer processes."""
    return int(cfg.capacity * seq)


def router_forward_flops(shape: F.Shape, batch: int, seq: int) -> int:
    """One router's forward: a [B·S, h] x [h, 1] product."""
    return 2 * batch * seq * shape.hidden


def step_flops(cfg: MixtureOfDepthsConfig, shape: F.Shape, batch: int, seq: int) -> int:
    """Training FLOPs of one step (3 x forward): routed layers at k tokens plus their routers."""
    n, k = len(routed_layers(cfg, shape.layers)), kept_tokens(cfg, seq)
    routed = F.layer_forward_flops(shape, batch, k) + router_forward_flops(shape, batch, seq)
    forward = (n * routed + (shape.layers - n) * F.layer_forward_flops(shape, batch, seq)
               + F.head_forward_flops(shape, batch, seq))
    return 3 * forward


def validate(spec, cfg: MixtureOfDepthsConfig) -> None:
    L, S = spec.model.num_layers, spec.workload.seq_length
    if spec.workload.kind != "train":
        errors.fail(spec, "workload.kind", f"Mixture-of-Depths trains a router; workload.kind is "
                    f"'{spec.workload.kind}' (decoding would need the paper's causal predictor).",
                    'set kind = "train" or remove [tricks.mixture_of_depths].')
    others = [name for name in spec.tricks if name != "mixture_of_depths" and registry.trick(name).runtime]
    if others:
        errors.fail(spec, "tricks", f"Mixture-of-Depths replaces the transformer layer; combined with "
                    f"{', '.join(others)} (whose runtime may replace it too) one would silently undo the other.",
                    "compare the techniques in separate variants.")
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < L]
        if bad:
            errors.fail(spec, KEY + "layers", f"layer ids {bad} are outside the model's layers 0..{L - 1}.",
                        f"use ids between 0 and {L - 1}.")
        if len(set(cfg.layers)) != len(cfg.layers):
            errors.fail(spec, KEY + "layers", "layer ids repeat.", "list each layer once.")
    if not 0 < cfg.capacity <= 1:
        errors.fail(spec, KEY + "capacity", f"capacity {cfg.capacity} must be in (0, 1].", "use e.g. 0.125.")
    if kept_tokens(cfg, S) < 1:
        errors.fail(spec, KEY + "capacity", f"capacity {cfg.capacity} x seq_length {S} keeps no token.",
                    f"use a capacity of at least {1 / S:.3g}.")
    if spec.parallel.sequence_parallel:
        errors.fail(spec, "parallel.sequence_parallel", "Mixture-of-Depths selects tokens along the sequence, "
                    "which sequence parallelism shards.", "set sequence_parallel = false.")


def _runtime(spec, cfg):
    from suite.tricks.mixture_of_depths.layer import MixtureOfDepthsRuntime

    return MixtureOfDepthsRuntime(spec, cfg)


def plan_row(spec, cfg: MixtureOfDepthsConfig) -> dict:
    """`suite plan`: the step's FLOPs, and the memory a routed layer does not use: it saves activations
    for its k tokens only (not under full recompute, which saves none)."""
    w, shape = spec.workload, F.Shape.of(spec.model)
    row = {"flops_per_step": step_flops(cfg, shape, w.global_batch, w.seq_length)}
    if spec.parallel.recompute != "full":
        p, skipped = spec.parallel, w.seq_length - kept_tokens(cfg, w.seq_length)
        first_stage = [i for i in routed_layers(cfg, shape.layers) if i < shape.layers // p.pp]
        row["memory"] = (-len(first_stage) * F.micro_batches_in_flight(spec)
                         * F.layer_activation_bytes(spec, w.micro_batch * skipped))
    return row


register(Trick(name="mixture_of_depths", config=MixtureOfDepthsConfig, validate=validate, runtime=_runtime,
               plan_row=plan_row))
