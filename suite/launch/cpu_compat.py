"""Run megatron-core on CPU: the few places where it hard-codes CUDA are redirected to the CPU.

megatron-core assumes a GPU in a handful of spots (``device="cuda"`` in the pipeline schedules,
``torch.cuda.current_device()``, ``Tensor.cuda()``, the CUDA RNG tracker, the CUDA type names its bf16
optimizer sorts parameters by).  ``enable()`` patches
exactly those, once per process, and only when no GPU is present, so the same runner code trains
over gloo on CPU in tests and CI.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def _to_cpu(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites any ``device=`` keyword naming CUDA to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        return func(*args, **kwargs)


_CUDA_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
               "torch.HalfTensor": "torch.cuda.HalfTensor"}


def _cuda_type_names(type_of):
    """``Tensor.type()`` (no arguments: the name query) answering with the CUDA name of a CPU tensor's type;
    ``type(dtype)`` conversions are untouched."""
    def named(self, *args, **kwargs):
        name = type_of(self, *args, **kwargs)
        return _CUDA_NAMES.get(name, name) if not args and not kwargs else name
    return named


def enable() -> None:
    """Patch torch and megatron-core for CPU execution (idempotent; no-op with a GPU)."""
    global _enabled
    if _enabled or torch.cuda.is_available():
        return
    from suite import quiet

    quiet.install_cpu()  # GPU-only advice from megatron-core (CUDA_DEVICE_MAX_CONNECTIONS)
    from megatron.core.tensor_parallel import random as mrandom

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None
    # The CUDA RNG tracker forks a CUDA generator; on CPU the global generator serves instead.
    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    mrandom.CudaRNGStatesTracker.add = lambda self, name, seed: None
    # Gradient clipping (CUDA asserts) is replaced on every device: suite.workloads.optimizer_kernels.
    # The bf16 optimizer (fp32 master weights) sorts parameters by ``Tensor.type()`` names that say CUDA.
    torch.Tensor.type = _cuda_type_names(torch.Tensor.type)
    _CudaToCpu().__enter__()
    _enabled = True


def is_enabled() -> bool:
    return _enabled
