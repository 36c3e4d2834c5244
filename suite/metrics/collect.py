"""Per-variant measurements that need every rank: peak memory, and scalars reduced over ranks."""
from __future__ import annotations

import resource

import torch
import torch.distributed as dist



def peak_memory() -> tuple[int, str]:
    """This rank's peak: device allocation on GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"  # Linux: KiB


def reduce_scalar(value: float | None, op, ctx) -> float | None:
    """All-reduce a per-rank scalar; None anywhere gives None."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.tensor([0.0 if value is None else float(value), 1.0 if value is None else 0.0],
                     dtype=torch.float64, device=device)
    dist.all_reduce(t[:1], op=op)
    missing = t[1:].clone()
    dist.all_reduce(missing, op=dist.ReduceOp.MAX)
    return None if missing.item() else t[0].item()
