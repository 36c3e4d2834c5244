"""megatron-core's optimizer multi-tensor kernels when neither apex nor Transformer Engine is installed.

megatron-core's optimizer does three things over every parameter with a multi-tensor kernel chosen at
import (``amp_C`` from apex, else Transformer Engine's, else a local Python fallback): the gradient norm
(``l2_norm_impl``), the clipping scale (``multi_tensor_scale_impl``), and the copy of the fp32 main
weights into the bf16 model weights (the same scale kernel with a factor of 1). Neither library is
installed here, so the fallback runs, and it costs a training step more than its arithmetic:

- its norm reads each parameter's norm back to the host (``torch.tensor`` of a list of CUDA scalars),
  one blocking copy per parameter, about 120 a step on the 1B model; after each the GPU waits for the
  host to launch the next kernel;
- its scale writes ``src * scale`` to a temporary and then copies it, two passes per tensor, also for the
  main-to-model weight copy where the factor is 1.

``install`` puts ``torch._foreach_*`` kernels, the ones ``torch.nn.utils.clip_grad_norm_`` and torch's
fused optimizers use, in the fallback's place, keeping the contract of amp_C's kernels: the norm of the
tensors of ``tensor_lists[0]`` as a one-element fp32 tensor on their device (and the per-tensor norms
when asked), ``dst = src * scale`` over ``tensor_lists = [src, dst]``. The swap goes through the module
attributes megatron itself assigns these kernels to, and only replaces its local fallback: with apex or
Transformer Engine installed their kernels stay.

megatron then still reads the total norm back once a step (``get_grad_norm_fp32`` ends in ``.item()``)
because its clipping decides on the host whether to scale (``clip_grad_by_total_norm_fp32``). That read
waits for the whole backward, so the host starts the optimizer's and the next step's launches only once
the GPU has drained, and cannot carry a lead from one step into the next (measured on the 1B fp8 step:
under 1%, ``reports/README.md``). ``install`` also replaces those two functions where megatron's
optimizer calls them (``megatron.core.optimizer.optimizer``): the 2-norm stays a device tensor (the same
kernel and the same all-reduce of the squared norm over megatron's groups), and the clip multiplies every
gradient by ``min(1, max_norm / (norm + 1e-6))`` computed on the device, as ``torch.nn.utils.
clip_grad_norm_`` does: megatron's scale where it clips, exactly 1 where it does not. Other norm types
and DTensor gradients (megatron's FSDP) keep megatron's functions; its optimizer returns the norm as a
tensor instead of a float.

Scaling every gradient costs a pass over the fp32 gradients (read and write, 9 GB a step on the 1B
model), also in the steps megatron would not have clipped. torch's fused Adam/AdamW (the ``fused`` and
``compile`` back-ends) can take the scale inside its own kernel, which reads every gradient anyway: it
divides each gradient by its ``grad_scale`` attribute, the hook torch's GradScaler uses. ``clip_in_step``
marks such optimizers' parameters, and the clip then sets ``grad_scale = 1 / scale`` on the device
instead of touching the gradients (the update equals clip-then-step up to the last bit of the division).
"""
from __future__ import annotations

import weakref

import torch


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's result: (total norm as a 1-element fp32 tensor, per-tensor norms or None)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """amp_C.multi_tensor_scale's effect: ``dst = src * factor`` for each pair (dst may be src, or another
    dtype: the main-to-model weight copy)."""
    src, dst = tensor_lists
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, factor)
    elif factor == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


def grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
    """megatron's ``get_grad_norm_fp32`` for the 2-norm without its read-back: the norm as a 0-dim fp32
    tensor on the gradients' device, from megatron's own norm kernel and the same all-reduce of its square
    over ``grad_stats_parallel_group``. Other norms and DTensor gradients go to megatron's function."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    grads = [grads_for_norm] if isinstance(grads_for_norm, torch.Tensor) else list(grads_for_norm)
    if float(norm_type) != 2.0 or any(utils.get_data_parallel_group_if_dtensor(g) is not None for g in grads):
        return clip_grads.get_grad_norm_fp32(grads, norm_type, grad_stats_parallel_group)
    device = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    squared = torch.zeros(1, dtype=torch.float32, device=device)
    if grads:
        flag = torch.zeros(1, dtype=torch.int, device=device)
        norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, flag, [grads], False)
        squared = norm.float().reshape(1) ** 2
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(squared, op=torch.distributed.ReduceOp.SUM, group=grad_stats_parallel_group)
    return squared.sqrt().reshape(())


def clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """megatron's ``clip_grad_by_total_norm_fp32`` (scale each gradient by ``max_norm / (total_norm +
    1e-6)`` when that is below 1) on any device; with ``total_norm`` a tensor the scale is clamped to 1 on
    the device and always applied, so nothing is read back."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    params = [p for p in params if getattr(p, attr, None) is not None]
    if not params:
        return
    grads = [getattr(p, attr).detach() for p in params]
    owners = [_step_taking_the_clip(p) for p in params]
    steps = {id(o): o for o in owners if o is not None}
    if isinstance(total_norm, torch.Tensor):
        coeff = (max_norm / (total_norm.float() + 1.0e-6)).clamp(max=1.0)
        if attr == "grad" and all(o is not None for o in owners):
            for optimizer in steps.values():
                optimizer.grad_scale = 1.0 / coeff  # its step divides every gradient by this
            return
        torch._foreach_mul_(grads, coeff.to(grads[0].device))
    elif (coeff := max_norm / (total_norm + 1.0e-6)) < 1.0:
        torch._foreach_mul_(grads, coeff)
    for optimizer in steps.values():  # scaled here: a scale left from an earlier step must not apply again
        optimizer.grad_scale = None


def clip_in_step(optimizers) -> int:
    """Let each of ``optimizers`` that is a torch Adam/AdamW with every group fused apply the clip inside
    its step (module docstring); returns how many. Its parameters hold a weak reference to it."""
    taking = 0
    for optimizer in optimizers:
        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            continue
        if not all(group.get("fused") for group in optimizer.param_groups):
            continue  # torch's foreach and single-tensor steps refuse a grad_scale
        ref = weakref.ref(optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p._suite_clip_in_step = ref
        taking += 1
    return taking


def _step_taking_the_clip(param):
    ref = getattr(param, "_suite_clip_in_step", None)
    return ref() if ref is not None else None


def install() -> None:
    """Replace megatron-core's local fallback kernels (idempotent: once replaced, they are no longer the
    fallback; leaves apex's or TE's in place), and its optimizer's norm and clip functions."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale
    optimizer.get_grad_norm_fp32 = grad_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_by_total_norm
