"""Mixture-of-Depths on megatron-core: a TransformerLayer with a router that runs on each sequence's
top-k tokens.

Plugged in through the layer spec (the spec's module becomes ``MixtureOfDepthsLayer``); layers outside
the routed set run the unmodified megatron-core layer. The router is a plain ``[1, h]`` weight named
``router.weight`` in the layer, so ``gpt.init_parameters`` draws it like any weight (normal(0, init_std),
seeded by its global name: identical on every TP rank) and the parameter gathers and checkpoints find it
by name. It is replicated across TP ranks; its input (the layer input) and the gradient reaching it are
identical on every rank of a TP group, so its gradient is too.

The selected tokens are gathered, run through the layer and scattered back with random-LTD's row
gather and scatter (``suite.tricks.random_ltd.layer``): the same sorted-positions trick keeps attention
among them causal, and RoPE follows their original positions. Routing applies in training and in
evaluation (it is the model's function), not in a KV-cache forward (see the package docstring).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.transformer_layer import TransformerLayer

from suite.metrics import flops as F
from suite.registry import TrickRuntime
from suite.tricks.mixture_of_depths import kept_tokens, routed_layers, step_flops
from suite.tricks.random_ltd.layer import gather_tokens, scatter_tokens


@dataclass
class Routing:
    """What routed layers share: which layers route, the capacity and the router scaling."""

    layers: set[int]
    capacity: float
    scale: str  # "sigmoid" | "linear" | "none"


def top_k_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [s, b] -> [b, k] positions of each sequence's k highest scores, sorted by position."""
    return scores.detach().t().topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def router_weight(logits: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "sigmoid":
        return torch.sigmoid(logits)
    if scale == "linear":
        return logits
    raise ValueError(f"unknown router_scale {scale!r}")


class MixtureOfDepthsLayer(TransformerLayer):
    def __init__(self, *args, routing: Routing | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing = routing
        self.routed = routing is not None and self.layer_number - 1 in routing.layers
        if self.routed:
            self.router = torch.nn.Linear(self.config.hidden_size, 1, bias=False,
                                          dtype=self.config.params_dtype)
            # r = 1 never reaches the router: a frozen weight, so no optimizer or DDP bucket waits for its grad
            self.router.weight.requires_grad_(routing.scale != "none")

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's checkpoint entry for every layer parameter stacks the layers on a prepended axis,
        which a parameter of only some layers cannot fill: the router is keyed by its own global layer
        instead (``decoder.layers.<i>.router.weight``), so any TP/PP layout saves and loads it."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.routed:
            name = f"{prefix}router.weight"  # the block rewrites the key's local prefix to "decoder.layers."
            out[name] = ShardedTensor.from_rank_offsets(f"{prefix}{self.layer_number - 1}.router.weight",
                                                        self.router.weight, replica_id=out[name].replica_id)
        return out

    def forward(self, hidden_states, **kwargs):
        if not self.routed:
            return super().forward(hidden_states=hidden_states, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise ValueError("Mixture-of-Depths expects the implicit causal mask (attention_mask=None)")
        if kwargs.get("inference_context") is not None or kwargs.get("inference_params") is not None:
            raise NotImplementedError("Mixture-of-Depths' top-k over the sequence is not causal: decoding with a "
                                      "KV cache needs the paper's causal predictor, which suite does not implement")
        seq, batch = hidden_states.shape[0], hidden_states.shape[1]
        k = kept_tokens(self.routing, seq)  # the capacity of this input's length (held-out windows may be shorter)
        logits = self.router(hidden_states).squeeze(-1)  # [s, b]
        idx = top_k_positions(logits, k)
        kept, rows = gather_tokens(hidden_states, idx)
        rope = kwargs.get("rotary_pos_emb")
        if rope is not None:  # [s, 1, 1, d] -> the kept tokens' original positions, [k, b, 1, d]
            kwargs["rotary_pos_emb"] = rope[:, 0][idx.t()]
        # sorted positions: causal attention among the kept tokens is the k x k top-left block
        out, context = super().forward(hidden_states=kept, **kwargs)
        if self.routing.scale != "none":
            r = router_weight(logits.reshape(-1).index_select(0, rows), self.routing.scale)
            out = kept + r.view(k, batch, 1).to(out.dtype) * (out - kept)
        return scatter_tokens(hidden_states, rows, out), context


class MixtureOfDepthsRuntime(TrickRuntime):
    def __init__(self, spec, cfg):
        self.cfg = cfg
        self.S, self.B = spec.workload.seq_length, spec.workload.global_batch
        self.shape = F.Shape.of(spec.model)
        self.routing = Routing(layers=set(routed_layers(cfg, spec.model.num_layers)), capacity=cfg.capacity,
                               scale=cfg.router_scale)

    def layer_spec(self, spec):
        spec = copy.deepcopy(spec)
        spec.module = MixtureOfDepthsLayer
        spec.params = {**(spec.params or {}), "routing": self.routing}
        return spec

    def step_flops(self, step: int) -> int:
        return step_flops(self.cfg, self.shape, self.B, self.S)

    def extra(self) -> dict:
        k = kept_tokens(self.cfg, self.S)
        n = len(self.routing.layers)
        return {"capacity": self.cfg.capacity, "kept_tokens": k, "routed_layers": sorted(self.routing.layers),
                "router_scale": self.cfg.router_scale,
                "layer_token_fraction": (n * k + (self.shape.layers - n) * self.S) / (self.shape.layers * self.S)}
