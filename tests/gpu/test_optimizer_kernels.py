"""megatron-core's optimizer kernels on CUDA (suite.workloads.optimizer_kernels): no host read-back.

The reason for replacing megatron's local fallback is that its norm copies every parameter's norm to the
host; here the replacements must run with CUDA's sync debug mode set to "error" (any synchronizing call
raises) and agree with megatron's own fallback, which is the reference (it synchronizes; it runs outside
that mode). Values: 120 fp32 tensors shaped like a 1B model's parameters, scaled down.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _grads():
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(768, 256), (256, 768), (256,), (1408, 256), (256, 704)] * 24
    return [torch.randn(s, device="cuda", generator=g) for s in shapes]


def test_norm_and_clip_run_without_a_host_sync_and_match_megatrons_fallback():
    from megatron.core import utils

    from suite.workloads import optimizer_kernels as ok

    grads = _grads()
    flag = torch.zeros(1, dtype=torch.int, device="cuda")
    reference, _ = utils.local_multi_tensor_l2_norm(2048 * 32, flag, [grads], False)
    clipped_ref = [t.clone() for t in grads]
    utils.local_multi_tensor_scale(2048 * 32, flag, [clipped_ref, clipped_ref], 0.5)
    model = [torch.empty_like(t, dtype=torch.bfloat16) for t in grads]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = ok.l2_norm(2048 * 32, flag, [grads], False)
        ok.scale(2048 * 32, flag, [grads, grads], 0.5)
        ok.scale(2048 * 32, flag, [grads, model], 1.0)  # main-to-model weight copy
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=0)
    for ours, ref, bf16 in zip(grads, clipped_ref, model):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        torch.testing.assert_close(bf16, ref.to(torch.bfloat16), rtol=0, atol=0)


def test_megatrons_norm_and_clip_as_installed_read_nothing_back():
    """The installed get_grad_norm_fp32 / clip_grad_by_total_norm_fp32: no sync, megatron's result (its own
    functions, which read the norm back, are the reference)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from suite.workloads import optimizer_kernels as ok

    ok.install()
    grads = _grads()
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    # megatron's norm function all-reduces over a process group; its fallback kernel, read back, is the reference
    flag = torch.zeros(1, dtype=torch.int, device="cuda")
    reference = float(utils.local_multi_tensor_l2_norm(2048 * 32, flag, [grads], False)[0])
    ref_params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(ref_params, grads):
        p.grad = g.clone()
    clip_grads.clip_grad_by_total_norm_fp32(ref_params, 1.0, reference)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = ok.grad_norm_fp32(grads)
        ok.clip_by_total_norm(params, 1.0, norm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(norm) == pytest.approx(reference, rel=1e-5) and reference > 1.0
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=0)
