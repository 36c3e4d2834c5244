"""A megatron-core model's parameters as one full-tensor dict, and back, under TP and PP.

Decision: gather, operate, scatter. Every rank gathers the *whole* model's full fp32 parameters
(TP parts joined by ``gpt.unshard``; pipeline stages exchanged with ``all_gather_object``), applies
the operators to plain tensors, and keeps its own part of the result with ``gpt.shard``, the rule
``init_parameters`` uses. It is simple and exact (no layout-specific operator code, and depth
coalescing can pair layers that live on different stages), at the cost of one full copy of the model
per rank at each level change: small next to the optimizer state these models already hold.
Data-parallel replicas compute the same result independently, so they need no communication.

Under bf16 the values come from and go to the optimizer's fp32 master weights (``main_param``),
so a level change does not round the parameters to bf16.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from suite.models import gpt


def _master(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 tensor the optimizer updates: megatron's main_param under bf16, else the parameter."""
    main = getattr(param, "main_param", None)
    return param if main is None else main


@torch.no_grad()
def full_state(chunks) -> dict[str, torch.Tensor]:
    """{global name: full fp32 tensor} of the whole model, on every rank (collective over TP and PP)."""
    state = {}
    for chunk in chunks:
        names, dims = gpt.global_names(chunk), gpt.partition_dims(chunk)
        for name, param in chunk.named_parameters():
            value = _master(param).detach().float()
            dim = dims.get(name)
            state[names[name]] = value.clone() if dim is None else gpt.unshard(value, dim, names[name])
    if ps.get_pipeline_model_parallel_world_size() > 1:
        device = next(iter(state.values())).device
        stages = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, {k: v.cpu() for k, v in state.items()},
                               group=ps.get_pipeline_model_parallel_group())
        state = {k: v.to(device) for stage in stages for k, v in stage.items()}
    return state


@torch.no_grad()
def load_state(chunks, state: dict[str, torch.Tensor]) -> None:
    """Set this rank's parameters (and fp32 master weights) from full tensors by global name."""
    for chunk in chunks:
        names, dims = gpt.global_names(chunk), gpt.partition_dims(chunk)
        for name, param in chunk.named_parameters():
            gname = names[name]
            if gname not in state:
                raise KeyError(f"no value for parameter '{gname}'")
            dim = dims.get(name)
            value = state[gname] if dim is None else gpt.shard(state[gname], dim, gname)
            if value.shape != param.shape:
                raise ValueError(f"{gname}: part of shape {tuple(value.shape)} for a parameter of {tuple(param.shape)}")
            param.copy_(value)
            if _master(param) is not param:
                _master(param).copy_(value)
