"""CQIL on megatron-core: a TransformerLayer subclass, a per-rank block spec, and the CQIL process groups.

See ``suite.parallel.cqil`` for the computation and the layout. Every rank's ``GPTModel`` is built
from a ``TransformerBlockSubmodules`` listing exactly the layers that rank runs; each layer keeps
its *global* number, so ``suite.models.gpt.init_parameters`` draws the same weights for it as for
the unmodified model. A group of size 1 (degree 1) runs the plain layer, bit for bit.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from suite.parallel.cqil import CQILPlan


@dataclass
class GroupRole:
    """Where a layer sits in its CQIL group: position k (= its CQIL rank) of ``size``."""

    position: int
    size: int
    bypass: int
    group: dist.ProcessGroup


class CQILLayer(TransformerLayer):
    """A transformer layer with a global number; inside a group it returns h + Σ_group (layer(h) − h)."""

    def __init__(self, config, submodules, layer_number: int = 1, *, global_layer: int,
                 role: GroupRole | None = None, **kwargs):
        super().__init__(config, submodules, layer_number=global_layer + 1, **kwargs)
        self.role = role if role is not None and role.size > 1 else None
        self._attention_output = None
        if self.role is not None and self.role.bypass:
            self.self_attention.register_forward_hook(self._keep_attention_output)

    def _keep_attention_output(self, module, args, output):
        # (output, bias), no bias here; a copy, as megatron's bias-dropout-add then adds the residual
        # into the output in place when no gradient is needed
        self._attention_output = output[0].clone()

    def forward(self, hidden_states, **kwargs):
        role = self.role
        if role is None:
            return super().forward(hidden_states=hidden_states, **kwargs)
        mid, context = self._forward_attention(hidden_states, **kwargs)
        if role.bypass:
            bypass = self._bypass(role)
            if bypass is not None:
                mid = mid + bypass
        out = self._forward_mlp(mid, kwargs.get("inference_context"), padding_mask=kwargs.get("padding_mask"))
        delta = out - hidden_states
        dist.all_reduce(delta, group=role.group)
        return hidden_states + delta, context

    def _bypass(self, role: GroupRole) -> torch.Tensor | None:
        """Σ of the attention outputs of the previous min(d, k) layers of the group (None for k = 0)."""
        mine = self._attention_output
        self._attention_output = None
        gathered = torch.empty((role.size * mine.shape[0], *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(gathered, mine, group=role.group)  # every rank joins, even k = 0
        gathered = gathered.view(role.size, *mine.shape)
        first = max(0, role.position - role.bypass)
        # a slice, not a list index: indexing by a list copies the index to the GPU, which a CUDA
        # graph capture forbids (the capturing rank failed and its peers hung in the next all-reduce)
        return gathered[first:role.position].sum(dim=0) if role.position else None


def new_groups(tp: int, degree: int, timeout_s: float | None = None) -> tuple[dist.ProcessGroup, int, list]:
    """(this rank's CQIL group, its CQIL rank, all CQIL groups) — collective: every rank calls it.

    One group per TP shard: the ranks with equal rank % tp (megatron's TP-fastest rank order, which
    the assertion checks), so each CQIL all-reduce runs alongside megatron's TP all-reduces.
    ``timeout_s``: the groups' collective timeout (torch's default for new groups is its library
    default, 10 or 30 minutes, not the default group's).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == tp * degree, f"CQIL needs tp x degree = {tp * degree} processes, got {world}"
    assert ps.get_tensor_model_parallel_rank() == rank % tp, "megatron's rank order is not TP-fastest"
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    group, groups = dist.new_subgroups_by_enumeration([[t + tp * c for c in range(degree)] for t in range(tp)],
                                                      timeout=timeout)
    return group, rank // tp, groups


def block_spec(layer_spec: ModuleSpec, plan: CQILPlan, cqil_rank: int,
               group: dist.ProcessGroup) -> TransformerBlockSubmodules:
    """The decoder block of CQIL rank ``cqil_rank``: its layer of every group plus all ungrouped
    layers, each a ``CQILLayer`` over ``layer_spec``'s submodules."""
    specs = []
    for layer, position in plan.layers_on(cqil_rank):
        role = None if position is None else GroupRole(position, plan.degree, plan.bypass, group)
        specs.append(ModuleSpec(module=CQILLayer, submodules=layer_spec.submodules,
                                params={"global_layer": layer, "role": role}))
    # the final norm: the model builder's (suite.models.gpt.block_spec sets it on every block)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=None)
