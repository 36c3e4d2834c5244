"""Cost of a *new* sequence length for torch SDPA on this GPU, per backend (forward + backward).

Random-LTD changes the kept length every few steps; a backend that builds a plan per shape pays
that at every change. Prints median time for first calls at new lengths and for repeated calls.
"""
import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def once(s, backends):
    q, k, v = (torch.randn(8, 16, s, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    t = time.perf_counter()
    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


for name, backends in [("default", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                       ("flash", [SDPBackend.FLASH_ATTENTION]),
                       ("efficient", [SDPBackend.EFFICIENT_ATTENTION])]:
    try:
        once(1024, backends)
        new = sorted(once(1024 + 16 * i, backends) for i in range(1, 12))
        same = sorted(once(1024, backends) for _ in range(11))
        print(f"{name:10s} new length: median {new[5]:7.2f} ms   same length: median {same[5]:7.2f} ms")
    except RuntimeError as e:
        print(f"{name:10s} unavailable: {str(e).splitlines()[0][:100]}")
