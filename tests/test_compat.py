"""The CPU compat layer (suite.launch.cpu_compat): megatron-core's CUDA assumptions redirected to the CPU.

``enable()`` patches torch process-wide (``Tensor.cuda``, ``torch.cuda.*``, a global
TorchFunctionMode), so every check runs in a fresh subprocess: ``python tests/test_compat.py CHECK``
runs one check function of this file and exits 0 when it passes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --- checks, each run in its own process ------------------------------------------------------------

def check_devices() -> None:
    import torch

    from suite.launch import cpu_compat

    assert not torch.cuda.is_available(), "this check is for CPU-only machines"
    assert not cpu_compat.is_enabled()
    cpu_compat.enable()
    assert cpu_compat.is_enabled()
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(3, device="cuda:0").device.type == "cpu"
    assert torch.ones(1, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.arange(4, device=0).device.type == "cpu"  # an int device means a CUDA ordinal
    x = torch.ones(1)
    y = x.cuda()
    assert y.device.type == "cpu" and y is x
    assert torch.ones(2).cuda(0).device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()
    torch.cuda.set_device(0)
    # CPU devices pass through untouched
    assert torch.empty(1, device="cpu").device.type == "cpu"
    assert torch.empty(1).device.type == "cpu"


def check_rng_tracker() -> None:
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    from suite.launch import cpu_compat

    cpu_compat.enable()
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(7)
    with tracker.fork():
        a = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(a, torch.rand(3)), "fork() on CPU draws from the global generator"


def _grads(seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((4, 3), (7,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 3
    return params


def check_clip_grad() -> None:
    import torch
    from megatron.core.optimizer import optimizer as moptimizer

    from suite.launch import cpu_compat

    cpu_compat.enable()
    clip = moptimizer.clip_grad_by_total_norm_fp32
    assert clip is cpu_compat._clip_grads_cpu, "megatron's optimizer must call the CPU replacement"
    for max_norm in (0.5, 2.0, 1e6):  # clipping hard, a little, not at all
        ours, ref = _grads(0), _grads(0)
        total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ours])))
        before = [p.grad.clone() for p in ours]
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        assert float(ref_norm) == pytest.approx(total, rel=1e-6)
        clip(ours, max_norm, total)
        for a, b, orig in zip(ours, ref, before):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
            if max_norm > total:
                assert torch.equal(a.grad, orig), "no clipping below the threshold"
        clipped = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ours])))
        assert clipped == pytest.approx(min(total, max_norm), rel=1e-5)
    # decoupled gradients (megatron's use_decoupled_grad) are scaled instead of .grad
    params = _grads(1)
    for p in params:
        p.decoupled_grad = p.grad * 2
    grads_before = [p.grad.clone() for p in params]
    dec_before = [p.decoupled_grad.clone() for p in params]
    clip(params, 1.0, 10.0, use_decoupled_grad=True)
    coeff = 1.0 / (10.0 + 1e-6)
    for p, g, d in zip(params, grads_before, dec_before):
        assert torch.equal(p.grad, g)
        torch.testing.assert_close(p.decoupled_grad, d * coeff, rtol=1e-6, atol=0)
    # parameters without a gradient are skipped, and an empty list is fine
    params = _grads(2)
    params[1].grad = None
    clip(params, 1.0, 10.0)
    clip([], 1.0, 10.0)


def check_idempotent() -> None:
    import torch
    from megatron.core.optimizer import optimizer as moptimizer
    from torch.overrides import _get_current_function_mode_stack

    from suite.launch import cpu_compat

    cpu_compat.enable()
    patched = (torch.Tensor.cuda, torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.set_device,
               moptimizer.clip_grad_by_total_norm_fp32)
    modes = list(_get_current_function_mode_stack())
    assert sum(type(m).__name__ == "_CudaToCpu" for m in modes) == 1
    cpu_compat.enable()
    cpu_compat.enable()
    assert (torch.Tensor.cuda, torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.set_device,
            moptimizer.clip_grad_by_total_norm_fp32) == patched
    assert list(_get_current_function_mode_stack()) == modes, "a second enable() must not stack another mode"
    assert cpu_compat.is_enabled()
    assert torch.empty(2, device="cuda").device.type == "cpu"


CHECKS = {f.__name__: f for f in (check_devices, check_rng_tracker, check_clip_grad, check_idempotent)}


# --- tests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("check", CHECKS)
def test_compat(check):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, check], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"{check} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip() == f"{check}: ok"


if __name__ == "__main__":
    CHECKS[sys.argv[1]]()
    print(f"{sys.argv[1]}: ok")
