"""megatron-core's optimizer multi-tensor kernels (suite.workloads.optimizer_kernels) against plain torch."""

import pytest
import torch

from suite.workloads import optimizer_kernels as ok


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(37, 11, generator=g), torch.randn(5, generator=g) * 1e3,
            torch.randn(4, 4, generator=g).to(torch.bfloat16), torch.zeros(3)]


def test_norm_is_the_norm_of_all_tensors_together_in_fp32():
    tensors = _tensors()
    flag = torch.zeros(1, dtype=torch.int)
    total, per = ok.l2_norm(2048 * 32, flag, [tensors], False)
    expected = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]))
    assert total.shape == (1,) and total.dtype == torch.float32 and per is None
    torch.testing.assert_close(total.double(), expected.reshape(1), rtol=1e-6, atol=0)
    _, per = ok.l2_norm(2048 * 32, flag, [tensors], True)
    torch.testing.assert_close(per.double(), torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors]),
                               rtol=1e-6, atol=0)
    empty, _ = ok.l2_norm(2048 * 32, flag, [[]], False)
    assert empty.tolist() == [0.0]


@pytest.mark.parametrize("factor", [0.25, 1.0])
def test_scale_writes_src_times_factor_into_dst(factor):
    src = _tensors()
    dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    ok.scale(0, None, [src, dst], factor)
    for s, d in zip(src, dst):
        assert d.dtype == torch.bfloat16
        torch.testing.assert_close(d, (s.float() * factor).to(torch.bfloat16), rtol=0, atol=0)
    inplace = [t.clone() for t in src if t.dtype == torch.float32]
    ok.scale(0, None, [inplace, inplace], factor)
    for before, after in zip([t for t in src if t.dtype == torch.float32], inplace):
        torch.testing.assert_close(after, before * factor, rtol=0, atol=0)


def test_install_replaces_only_megatrons_local_fallback(monkeypatch):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    apex_like = object()  # an installed library's kernel must stay
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", apex_like)
    ok.install()
    assert clip_grads.l2_norm_impl is ok.l2_norm and clip_grads.multi_tensor_scale_impl is ok.scale
    assert optimizer.multi_tensor_scale_impl is apex_like


def test_megatron_clips_through_the_installed_kernels(monkeypatch):
    """megatron's own norm-then-clip, called the way its optimizer calls it, with the kernels installed."""
    from megatron.core.optimizer import clip_grads

    monkeypatch.setattr(clip_grads, "l2_norm_impl", ok.l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", ok.scale)
    monkeypatch.setattr(clip_grads, "multi_tensor_applier", lambda op, flag, lists, *a: op(2048 * 32, flag, lists, *a))
    grads = [t.float() for t in _tensors()]
    norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    calls = []
    monkeypatch.setattr(clip_grads.torch.distributed, "all_reduce", lambda t, **k: calls.append(t))
    monkeypatch.setattr(clip_grads.torch, "zeros", lambda *a, device=None, **k: torch.empty(0).new_zeros(*a, **k))
    total = clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=None)
    assert total == pytest.approx(norm, rel=1e-6) and calls
