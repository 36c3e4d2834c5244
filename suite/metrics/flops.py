"""Analytic parameter, FLOP and memory counts for the LLaMA-style GPT (no torch needed).

Model FLOPs of one forward pass over ``b`` sequences of ``s`` tokens (a multiply-add = 2 FLOPs),
per layer, with h = hidden, d = h / heads, g = query groups, f = SwiGLU width:

    QKV projection         2·b·s·h·(h + 2·g·d)
    scores  Q·Kᵀ           2·b·s²·h          (full s×s, the usual "model FLOPs" convention:
    values  P·V            2·b·s²·h           causal masking is not subtracted)
    output projection      2·b·s·h²
    SwiGLU MLP             3 · 2·b·s·h·f      (gate, up, down)

plus the LM head 2·b·s·h·V. Norms, RoPE, softmax and the loss are O(b·s·h) and ignored.
Training = forward + backward = 3 × forward (recomputation is not counted: these are *model*
FLOPs, so MFU does not reward recompute). ``tests/test_flops.py`` checks this against
``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

from dataclasses import dataclass


def padded_vocab(vocab: int, multiple: int = 128) -> int:
    """Vocabulary padded so every TP size up to 128 splits it evenly (and identically)."""
    return -(-vocab // multiple) * multiple


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    groups: int
    ffn: int
    vocab: int  # padded

    @classmethod
    def of(cls, model) -> "Shape":
        return cls(model.num_layers, model.hidden_size, model.num_attention_heads,
                   model.num_query_groups, model.ffn_hidden_size, padded_vocab(model.vocab_size))

    @property
    def kv_dim(self) -> int:
        return 2 * self.groups * (self.hidden // self.heads)


def layer_params(s: Shape) -> int:
    h = s.hidden
    attn = h * (h + s.kv_dim) + h * h
    mlp = 3 * h * s.ffn
    return attn + mlp + 2 * h  # two RMSNorm weights


def parameters(s: Shape) -> dict:
    embed = s.vocab * s.hidden
    layers = s.layers * layer_params(s)
    head = s.vocab * s.hidden + s.hidden  # untied output layer + final norm
    return {"total": embed + layers + head, "non_embedding": layers + s.hidden,
            "embedding": embed, "output": s.vocab * s.hidden}


def layer_forward_flops(s: Shape, batch: int, seq: int, attn_seq: int | None = None) -> int:
    """One layer's forward FLOPs for ``seq`` tokens per sequence (``attn_seq`` keys per query)."""
    kv = seq if attn_seq is None else attn_seq
    h, tokens = s.hidden, batch * seq
    linear = 2 * tokens * h * (h + s.kv_dim) + 2 * tokens * h * h + 3 * 2 * tokens * h * s.ffn
    attention = 2 * 2 * batch * seq * kv * h
    return linear + attention


def head_forward_flops(s: Shape, batch: int, seq: int) -> int:
    return 2 * batch * seq * s.hidden * s.vocab


def forward_flops(s: Shape, batch: int, seq: int) -> int:
    return s.layers * layer_forward_flops(s, batch, seq) + head_forward_flops(s, batch, seq)


def train_step_flops(s: Shape, global_batch: int, seq: int) -> int:
    return 3 * forward_flops(s, global_batch, seq)


# Saved activations of one LLaMA-style layer, bytes per token: ACT_PER_HIDDEN·h + ACT_PER_FFN[kernels]·f at
# 16-bit. Fitted to the peak memory of this project's GPU training records (H100 and H200; 12 × 768, 12 × 1024,
# 20 × 2048 with f ≈ 2.7h): 47.6–50.5 bytes per token·h and layer with the `torch` back-end, 36.9–40.7 with
# `fused` and `compile`. The FFN's share was measured apart on CPU by counting the tensors autograd saves while
# f changes: 10 bytes per unit of f unfused (fc1's gate and up, silu's output, their product, ...), 6 with the
# fused SwiGLU. The rest, ~23 bytes per unit of h (norm inputs and outputs, q, k, v after RoPE, the attention
# output; flash attention keeps no s² scores), is the same for every back-end. With Korthikanti et al.'s
# 34·s·b·h (a GELU MLP of 4h, dropout masks) instead, the whole estimate read 28–31% under those peaks.
# The logits: fp32 logits, softmax and their gradient (12 bytes per token and vocabulary entry) with the
# fused cross-entropy; megatron's unfused one keeps about twice that (the 1.16 B model, vocabulary 32 000:
# 40.2 GiB peak with `torch`, 33.9 with `fused`). `compile`'s own loss at tp = 1 (kernels.compile_loss) keeps
# the 16-bit logits and writes their 16-bit gradient: 4 bytes, counted on CPU from the tensors autograd saves;
# on one H200 the 1B model's `compile` peak fell by 2.5 GB with it (37.5 -> 35.0 GB; 12 -> 4 bytes predicts 2.1).
ACT_PER_HIDDEN = 23
ACT_PER_FFN = {"torch": 10, "fused": 6, "compile": 6}
LOGITS_PER_VOCAB = {"torch": 24, "fused": 12, "compile": 12}
LOGITS_PER_VOCAB_COMPILED_LOSS = 4


def layer_activation_bytes(spec, tokens: int) -> float:
    """Bytes one layer saves for its backward pass over ``tokens`` tokens of one micro-batch, per GPU."""
    s, w = Shape.of(spec.model), spec.workload
    layer = tokens * (ACT_PER_HIDDEN * s.hidden + ACT_PER_FFN[spec.model.kernels] * s.ffn) / spec.parallel.tp
    return layer * 2 if w.precision == "fp32" else layer


def logits_bytes(spec) -> float:
    """Bytes one micro-batch's logits and their loss keep for the backward pass, per GPU (LOGITS_PER_VOCAB; the
    fused cross-entropy needs bf16 weights, fp32 variants run the unfused one)."""
    w, vocab = spec.workload, Shape.of(spec.model).vocab  # the padded vocabulary the LM head computes
    if spec.model.kernels == "compile" and spec.parallel.tp == 1:
        per_vocab = LOGITS_PER_VOCAB_COMPILED_LOSS * (1 if w.bf16 else 2)
    else:
        per_vocab = LOGITS_PER_VOCAB[spec.model.kernels if w.bf16 else "torch"]
    return per_vocab * w.micro_batch * w.seq_length * vocab / spec.parallel.tp


def micro_batches_in_flight(spec) -> int:
    """Micro-batches whose activations the first pipeline stage holds at once under 1F1B."""
    return min(spec.parallel.pp, spec.workload.global_batch // spec.workload.micro_batch)


def memory_estimate_bytes(spec) -> dict:
    """Rough peak memory per GPU on the first pipeline stage (the fullest one under 1F1B).

    Weights + gradients + Adam state per parameter: bf16 with fp32 master weights, fp32 grads and
    Adam moments = 2 + 4 + 4 + 8 = 18 bytes; fp32 = 4 + 4 + 8 = 16. Activations per layer and
    micro-batch: s·b·(ACT_PER_HIDDEN·h + ACT_PER_FFN·f) bytes at 16-bit (see above) divided by tp, doubled
    for fp32, ×(pp in flight) micro-batches on the first stage; full recompute keeps only layer inputs
    (2·s·b·h) plus two layers' activations (the one recomputed and the gradients through it). The logits
    (LOGITS_PER_VOCAB) count only when the first stage is also the last. An estimate to plan with, not a
    measurement.
    """
    s, p, w = Shape.of(spec.model), spec.parallel, spec.workload
    params = parameters(s)
    per_stage_layers = s.layers // p.pp
    params_gpu = (per_stage_layers * layer_params(s) + s.vocab * s.hidden) / p.tp
    state = params_gpu * (18 if w.bf16 else 16)
    tokens = w.seq_length * w.micro_batch
    layer = layer_activation_bytes(spec, tokens)
    in_flight = micro_batches_in_flight(spec)
    if p.recompute == "full":
        activations = 2 * tokens * s.hidden * per_stage_layers * in_flight + 2 * layer
    else:
        activations = layer * per_stage_layers * in_flight
    logits = logits_bytes(spec) if p.pp == 1 else 0
    total = state + activations + logits
    return {"weights_and_optimizer": int(state), "activations": int(activations),
            "logits": int(logits), "total": int(total), "parameters_per_gpu": int(params_gpu),
            "parameters": params["total"]}
