"""Random-LTD on megatron-core: a TransformerLayer that runs on a random subset of tokens.

Plugged in through the layer spec (the spec's module becomes ``RandomLTDLayer``); layers outside
the dropping set, evaluation (``model.eval()``) and a kept length equal to the sequence run the
unmodified megatron-core layer.

Indices are drawn on the activations' device (no host sync) from a generator seeded by (seed, step,
layer, first global sample of the micro-batch), so every rank of a TP group draws the same indices,
and the same sample draws the same indices at any TP/PP/DP layout on the same kind of device.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from suite.metrics import flops as F
from suite.tricks.random_ltd import dropping_layers, kept_length, layer_tokens, step_flops
from suite.registry import TrickRuntime


@dataclass
class DropState:
    """What the dropping layers need to know about the current step (set by the runtime)."""

    seed: int
    layers: set[int]
    step: int = 0
    kept: int = 0
    sample_offset: int = 0
    history: list = field(default_factory=list)


_GENERATORS: dict[str, torch.Generator] = {}


def kept_indices(state: DropState, layer_id: int, batch: int, seq: int, device="cpu") -> torch.Tensor:
    """[batch, kept] sorted positions; uniform without replacement, independent per sample/layer."""
    key = ((state.seed * 1_000_003 + state.step) * 1_009 + layer_id) * 100_003 + state.sample_offset
    device = torch.device(device)
    gen = _GENERATORS.setdefault(str(device), torch.Generator(device=device))  # reseeded, not rebuilt
    gen.manual_seed(key % 2**63)  # manual_seed takes 64 bits
    scores = torch.rand(batch, seq, generator=gen, device=device)
    return scores.argsort(dim=1)[:, :state.kept].sort(dim=1).values


def token_rows(idx: torch.Tensor, batch: int) -> torch.Tensor:
    """Rows of the [s·b, h] view of an [s, b, h] tensor holding positions idx [b, r], in [r, b] order."""
    return (idx.t() * batch + torch.arange(batch, device=idx.device)).reshape(-1)


class _GatherRows(torch.autograd.Function):
    """x[rows] with a backward that copies instead of accumulating: rows are unique, so the
    index_add that index_select's backward uses (atomics over every element) is not needed."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        ctx.n = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.new_zeros((ctx.n, *grad.shape[1:])).index_copy_(0, rows, grad), None


def gather_tokens(hidden: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [s, b, h], idx [b, r] -> (kept [r, b, h], the rows to scatter back with scatter_tokens)."""
    s, b, h = hidden.shape
    rows = token_rows(idx.to(hidden.device), b)
    return _GatherRows.apply(hidden.reshape(s * b, h), rows).view(-1, b, h), rows


def scatter_tokens(hidden: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """hidden with the kept rows replaced by the layer's output; index_copy's backward is copies too."""
    s, b, h = hidden.shape
    return hidden.reshape(s * b, h).index_copy(0, rows, kept.reshape(-1, h)).view(s, b, h)


class RandomLTDLayer(TransformerLayer):
    def __init__(self, *args, drop_state: DropState | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_state = drop_state

    def forward(self, hidden_states, **kwargs):
        state, layer_id = self.drop_state, self.layer_number - 1
        seq, batch = hidden_states.shape[0], hidden_states.shape[1]
        if (not self.training or state is None or layer_id not in state.layers or state.kept >= seq):
            return super().forward(hidden_states=hidden_states, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise ValueError("random-LTD expects the implicit causal mask (attention_mask=None)")
        idx = kept_indices(state, layer_id, batch, seq, hidden_states.device)
        kept, rows = gather_tokens(hidden_states, idx)
        rope = kwargs.get("rotary_pos_emb")
        if rope is not None:  # [s, 1, 1, d] -> the kept tokens' original positions, [r, b, 1, d]
            kwargs["rotary_pos_emb"] = rope[:, 0][idx.t()]
        # sorted indices: the causal mask among kept tokens is the r x r top-left block (is_causal)
        out, context = super().forward(hidden_states=kept, **kwargs)
        return scatter_tokens(hidden_states, rows, out), context


class RandomLTDRuntime(TrickRuntime):
    def __init__(self, spec, cfg):
        self.cfg = cfg
        self.L, self.S = spec.model.num_layers, spec.workload.seq_length
        self.B = spec.workload.global_batch
        self.shape = F.Shape.of(spec.model)
        self.state = DropState(seed=spec.workload.seed, layers=set(dropping_layers(cfg, self.L)))
        self.consumed_layer_tokens = 0

    def layer_spec(self, spec):
        spec = copy.deepcopy(spec)
        spec.module = RandomLTDLayer
        spec.params = {**(spec.params or {}), "drop_state": self.state}
        # kept lengths change every few steps: keep attention off per-shape-planned backends below the
        # full length (which recurs every step, so the default selection pays off there)
        attn = spec.submodules.self_attention.submodules
        attn.core_attention = ModuleSpec(module=attn.core_attention,
                                         params={"fixed_shapes": False, "full_length": self.S})
        return spec

    def begin_step(self, step: int) -> None:
        self.state.step = step
        self.state.kept = kept_length(self.cfg, step, self.S)
        if not self.state.history or self.state.history[-1][1] != self.state.kept:
            self.state.history.append([step, self.state.kept])
        self.consumed_layer_tokens += layer_tokens(self.cfg, step, self.B, self.S, self.L)

    def begin_microbatch(self, sample_offset: int) -> None:
        self.state.sample_offset = sample_offset

    def step_flops(self, step: int) -> int:
        return step_flops(self.cfg, self.shape, step, self.B, self.S)

    def lr_units(self):
        if not self.cfg.layer_token_lr:
            return None
        return self.B * self.S, lambda step: layer_tokens(self.cfg, step, self.B, self.S, self.L) / self.L

    def step_point(self, step: int) -> dict:
        return {"kept": kept_length(self.cfg, step, self.S)}  # step time is compared per kept length

    def extra(self) -> dict:
        return {"kept_length_schedule": self.state.history, "layer_tokens": self.consumed_layer_tokens,
                "dropping_layers": sorted(self.state.layers)}
