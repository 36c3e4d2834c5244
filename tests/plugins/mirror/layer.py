"""The mirror mode's layer: megatron's TransformerLayer whose output is averaged over the mirror ranks."""
from __future__ import annotations

import torch.distributed as dist
from megatron.core.transformer.transformer_layer import TransformerLayer

CALLS = {"all_reduce": 0}  # per process: how often the layer reached its collective


class MirrorLayer(TransformerLayer):
    def __init__(self, config, submodules, layer_number: int = 1, *, group=None, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.group = group

    def forward(self, hidden_states, **kwargs):
        out, context = super().forward(hidden_states=hidden_states, **kwargs)
        dist.all_reduce(out, group=self.group)
        CALLS["all_reduce"] += 1
        return out / dist.get_world_size(self.group), context
