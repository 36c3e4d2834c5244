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


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((4, 3), (7,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return params


def _norm(params, attr="grad"):
    return torch.linalg.vector_norm(torch.cat([getattr(p, attr).double().flatten() for p in params]))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["host_norm", "device_norm"])
@pytest.mark.parametrize("max_norm", [0.5, 2.0, 1e6], ids=["hard", "a_little", "not_at_all"])
def test_clip_matches_torchs_clip_grad_norm(max_norm, as_tensor):
    ours, ref = _params(0), _params(0)
    before = [p.grad.clone() for p in ours]
    total = _norm(ours)
    torch.nn.utils.clip_grad_norm_(ref, max_norm)
    ok.clip_by_total_norm(ours, max_norm, total.float() if as_tensor else float(total))
    for a, b, orig in zip(ours, ref, before):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        if max_norm > total:
            assert torch.equal(a.grad, orig), "under the threshold the gradients stay exactly as they were"
    assert float(_norm(ours)) == pytest.approx(min(float(total), max_norm), rel=1e-5)


def test_clip_scales_decoupled_gradients_and_skips_missing_ones():
    params = _params(1)
    for p in params:
        p.decoupled_grad = p.grad * 2
    grads, decoupled = [p.grad.clone() for p in params], [p.decoupled_grad.clone() for p in params]
    ok.clip_by_total_norm(params, 1.0, torch.tensor(10.0), use_decoupled_grad=True)
    for p, g, d in zip(params, grads, decoupled):
        assert torch.equal(p.grad, g)
        torch.testing.assert_close(p.decoupled_grad, d * (1.0 / (10.0 + 1e-6)), rtol=1e-6, atol=0)
    params = _params(2)
    params[1].grad = None
    ok.clip_by_total_norm(params, 1.0, torch.tensor(10.0))
    assert params[1].grad is None
    ok.clip_by_total_norm([], 1.0, 10.0)


def _adamw(params, fused: bool):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused, foreach=False if fused else None)


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["hard", "not_at_all"])
def test_a_fused_step_applies_the_clip_itself(max_norm):
    """clip_in_step: the gradients are not touched, and the fused step's update equals clip-then-step
    (within fp32 rounding of the division), over three steps, clipping or not."""
    ours, ref = _params(3), _params(3)
    opt, ref_opt = _adamw(ours, fused=True), _adamw(ref, fused=True)
    assert ok.clip_in_step([opt, torch.optim.SGD(_params(4), lr=0.1), _adamw(_params(5), fused=False)]) == 1
    for step in range(3):
        for a, b in zip(ours, ref):
            a.grad = b.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step)) * 3
        before, norm = [p.grad.clone() for p in ours], float(_norm(ours))
        ok.clip_by_total_norm(ours, max_norm, torch.tensor(norm))
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, before)), "the clip left to the step"
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert float(opt.grad_scale) == pytest.approx(max(1.0, norm / max_norm), rel=1e-5)


def test_the_clip_scales_gradients_when_a_step_cannot_take_it():
    """Parameters of an unfused optimizer among them, decoupled gradients, or a host norm: the gradients
    are scaled, and a scale an earlier step left on the fused optimizer is cleared, not applied twice."""
    fused, plain = _params(6), _params(7)
    opt = _adamw(fused, fused=True)
    ok.clip_in_step([opt, _adamw(plain, fused=False)])
    ok.clip_by_total_norm(fused, 1.0, torch.tensor(10.0))
    assert opt.grad_scale is not None
    grads = [p.grad.clone() for p in fused + plain]
    ok.clip_by_total_norm(fused + plain, 1.0, torch.tensor(10.0))
    for p, g in zip(fused + plain, grads):
        torch.testing.assert_close(p.grad, g * (1.0 / (10.0 + 1e-6)), rtol=1e-6, atol=0)
    assert opt.grad_scale is None
    ok.clip_by_total_norm(fused, 1.0, torch.tensor(10.0))
    ok.clip_by_total_norm(fused, 1.0, 10.0)  # a host norm: megatron's own semantics, on the gradients
    assert opt.grad_scale is None


def test_grad_norm_stays_a_tensor_and_sums_squares_over_the_group(monkeypatch):
    from megatron.core.optimizer import clip_grads

    monkeypatch.setattr(clip_grads, "l2_norm_impl", ok.l2_norm)  # as installed (megatron's asks for CUDA)
    params = _params(3)
    grads = [p.grad for p in params]
    norm = ok.grad_norm_fp32(grads)
    assert isinstance(norm, torch.Tensor) and norm.shape == () and norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), _norm(params), rtol=1e-6, atol=0)
    assert float(ok.grad_norm_fp32([])) == 0.0
    # two ranks holding the same gradients: the all-reduced norm is sqrt(2) times one rank's
    reduced = []

    def all_reduce(t, op=None, group=None):
        reduced.append(group)
        t.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    group = object()
    torch.testing.assert_close(ok.grad_norm_fp32(grads, grad_stats_parallel_group=group).double(),
                               _norm(params) * 2 ** 0.5, rtol=1e-6, atol=0)
    assert reduced == [group]


def test_other_norm_types_go_to_megatron(monkeypatch):
    from megatron.core.optimizer import clip_grads

    seen = []
    monkeypatch.setattr(clip_grads, "get_grad_norm_fp32", lambda *a: seen.append(a) or 7.0)
    assert ok.grad_norm_fp32([torch.ones(3)], float("inf")) == 7.0 and seen[0][1] == float("inf")


def test_install_routes_megatrons_optimizer_through_the_device_norm_and_clip(monkeypatch):
    from megatron.core.optimizer import optimizer

    monkeypatch.setattr(optimizer, "get_grad_norm_fp32", None)
    monkeypatch.setattr(optimizer, "clip_grad_by_total_norm_fp32", None)
    ok.install()
    assert optimizer.get_grad_norm_fp32 is ok.grad_norm_fp32
    assert optimizer.clip_grad_by_total_norm_fp32 is ok.clip_by_total_norm
