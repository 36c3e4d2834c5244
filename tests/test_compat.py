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


def check_idempotent() -> None:
    import torch
    from torch.overrides import _get_current_function_mode_stack

    from suite.launch import cpu_compat

    cpu_compat.enable()
    patched = (torch.Tensor.cuda, torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.set_device,
               torch.Tensor.type)
    modes = list(_get_current_function_mode_stack())
    assert sum(type(m).__name__ == "_CudaToCpu" for m in modes) == 1
    cpu_compat.enable()
    cpu_compat.enable()
    assert (torch.Tensor.cuda, torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.set_device,
            torch.Tensor.type) == patched
    assert list(_get_current_function_mode_stack()) == modes, "a second enable() must not stack another mode"
    assert cpu_compat.is_enabled()
    assert torch.empty(2, device="cuda").device.type == "cpu"


CHECKS = {f.__name__: f for f in (check_devices, check_rng_tracker, check_idempotent)}


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
