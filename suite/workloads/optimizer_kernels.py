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
when asked), ``dst = src * scale`` over ``tensor_lists = [src, dst]``. Nothing is read back to the host
here; megatron reads the total norm once, after its all-reduce. The swap goes through the module
attributes megatron itself assigns these kernels to, and only replaces its local fallback: with apex or
Transformer Engine installed their kernels stay.
"""
from __future__ import annotations

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


def install() -> None:
    """Replace megatron-core's local fallback kernels (idempotent: once replaced, they are no longer the
    fallback; leaves apex's or TE's in place)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale
