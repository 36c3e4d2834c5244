"""Core attention through torch's scaled_dot_product_attention.

megatron-core's local ``DotProductAttention`` materialises the s×s score matrix; without
Transformer Engine this module takes its place in the layer spec so that GPUs run a fused
(flash / memory-efficient) kernel and the CPU runs torch's fused path. Same call signature:
query [s, b, heads, d], key/value [s, b, groups, d] -> [s, b, heads·d].

``fixed_shapes=False`` pins an explicit backend list (flash, memory-efficient, math) for lengths below
``full_length``. Measured on an H100 with torch 2.11 (bench/sdpa_shapes.py): under torch's default
selection the first call at a new sequence length took ~130 ms for one forward + backward, against
< 1.2 ms with an explicit list, while for a fixed length the default selection trained a 1B model 8%
faster than the explicit list. So the default stays for fixed shapes, and techniques whose lengths
change every few steps (random-LTD's kept-length schedule) ask for the explicit list in their layer
spec. The full training length is the exception: it recurs every step (and, once random-LTD's schedule
reaches it, is the only length), so the per-shape planning cost is paid once, and under the explicit
list random-LTD's dropping layers ran about 10% slower there than the baseline's (default selection:
cuDNN attention on H100/H200). A layer that knows its full length (``full_length``) uses the default
selection at that length and the explicit list below it; without it, every length gets the list.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

VARYING_SHAPE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type=None,
                 attention_dropout=None, softmax_scale=None, fixed_shapes: bool = True,
                 full_length: int | None = None, **_):
        super().__init__(config=config)
        if config.attention_dropout and config.attention_dropout > 0:
            raise ValueError("SDPAttention in suite runs without attention dropout")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.fixed_shapes, self.full_length = fixed_shapes, full_length

    def backends(self, length: int) -> list | None:
        """The SDPA backends for a sequence of ``length`` tokens; None: torch's default selection."""
        if self.fixed_shapes or (self.full_length is not None and length >= self.full_length):
            return None
        return VARYING_SHAPE_BACKENDS

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != q.shape[1]:  # grouped-query attention: share each K/V head
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = None if causal or attention_mask is None else ~attention_mask
        backends = self.backends(q.shape[2])
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
