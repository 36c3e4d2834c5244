"""CQIL's accuracy side on one device: the concurrent model's function, LoRA adapters, and the
fine-tune with knowledge distillation from the original model that recovers accuracy.

``concurrent_logits`` computes, on one process, the same function the distributed CQIL forward
(``layer.py``) computes over P GPUs: per group with input h, every layer j of the group gets h,
``a_j = attn_j(norm(h))``, ``m_j = h + a_j + Σ_{i=1..min(d,k)} a_{j−i}``,
``out_j = m_j + mlp_j(norm(m_j))``, and the group outputs ``h + Σ_j (out_j − h)`` (see
``suite.parallel.cqil`` for the bypass convention). ``tests/test_cqil.py`` checks it against the
distributed runs' logits. Quality does not depend on where the layers run, so the accuracy of a
deployment is measured here, without P GPUs, as the authors also fine-tune a simulated model.

The fine-tune follows the authors' recovery recipe: LoRA (rank r, scale alpha / r) on the QKV,
attention-output, MLP-in and MLP-out projections of every layer, base weights frozen; loss =
KL(teacher ‖ student) per token at temperature 1, where the teacher is the same model with the
adapters off and no CQIL (one model run twice, as in their code); AdamW on the adapters only,
constant learning rate, gradient clipping at 1.
"""
from __future__ import annotations

import math
import time

import torch

from suite.parallel.cqil import CQILPlan, Finetune

ADAPTED = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def concurrent_logits(model, tokens: torch.Tensor, plan: CQILPlan | None) -> torch.Tensor:
    """Logits [b, s, padded vocab] of ``model`` (a TP = PP = 1 GPTModel) run as CQIL ``plan``
    prescribes; ``plan=None``: the unmodified model."""
    if plan is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return model(tokens, positions, None)
    h = model.embedding(input_ids=tokens, position_ids=None)
    rope = model.rotary_pos_emb(tokens.shape[1])
    layers, first = model.decoder.layers, {g[0]: g for g in plan.groups}
    i = 0
    while i < len(layers):
        if i not in first:
            h, _ = layers[i](hidden_states=h, attention_mask=None, rotary_pos_emb=rope)
            i += 1
            continue
        attention, delta = [], 0
        for k, j in enumerate(first[i]):
            layer = layers[j]
            a, _ = layer.self_attention(layer.input_layernorm(h), attention_mask=None, rotary_pos_emb=rope)
            mid = h + a + sum(attention[max(0, k - plan.bypass):k])  # bypass: the previous d outputs
            out = mid + layer.mlp(layer.pre_mlp_layernorm(mid))[0]
            attention.append(a)
            delta = delta + (out - h)
        h = h + delta
        i += len(first[i])
    logits, _ = model.output_layer(model.decoder.final_layernorm(h))
    return logits.transpose(0, 1)


class LoRA(torch.nn.Module):
    """Low-rank adapters on a model's projections, added through forward hooks (megatron's linear
    layers return ``(output, bias)``); ``enabled = False`` runs the base model."""

    def __init__(self, model, rank: int, alpha: float):
        super().__init__()
        self.scale, self.enabled, self.handles, self.adapted = alpha / rank, True, [], []
        self.down, self.up = torch.nn.ParameterList(), torch.nn.ParameterList()
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] not in ADAPTED:
                continue
            w = module.weight
            down = torch.empty(rank, w.shape[1], device=w.device, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # as in the peft library; up = 0: a no-op at start
            self.down.append(torch.nn.Parameter(down))
            self.up.append(torch.nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device)))
            self.handles.append(module.register_forward_hook(self._hook(len(self.up) - 1), with_kwargs=True))
            self.adapted.append(module)
        for p in model.parameters():
            p.requires_grad_(False)

    def _hook(self, i: int):
        def add(module, args, kwargs, output):
            if not self.enabled:
                return output
            x = args[0] if args else kwargs["input_"]
            out, bias = output
            low = (x.float() @ self.down[i].t()) @ self.up[i].t()
            return out + (self.scale * low).to(out.dtype), bias
        return add

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def merge(self) -> None:
        """Folds each adapter into its layer's weight (W + scale * up @ down, rounded to W's dtype) and
        removes the hooks: the plain model then computes what the adapted one did, and saves or exports
        like any other."""
        with torch.no_grad():
            for module, down, up in zip(self.adapted, self.down, self.up):
                module.weight.add_((self.scale * (up @ down)).to(module.weight.dtype))
        self.remove()


def kl_per_token(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student), both [..., vocab] log-probabilities."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


def logprobs(model, tokens: torch.Tensor, plan: CQILPlan | None, vocab: int) -> torch.Tensor:
    return torch.log_softmax(concurrent_logits(model, tokens, plan)[..., :vocab].float(), dim=-1)


def distillation_kl(model, plan: CQILPlan, lora: LoRA | None, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """KL(original ‖ CQIL model) per token on ``tokens``: the teacher is the model without adapters or
    CQIL (no gradient), the student the CQIL model with its adapters."""
    with torch.no_grad():
        if lora is not None:
            lora.enabled = False
        teacher = logprobs(model, tokens, None, vocab)
        if lora is not None:
            lora.enabled = True
    return kl_per_token(teacher, logprobs(model, tokens, plan, vocab))


def finetune(model, plan: CQILPlan, cfg: Finetune, train: torch.Tensor, seq_length: int, vocab: int,
             seed: int, log=print) -> tuple[LoRA, dict]:
    """Fits LoRA adapters so that the concurrent model matches the original; returns them (attached,
    enabled) and the record's ``finetune`` block."""
    lora = LoRA(model, cfg.rank, cfg.alpha)
    params = list(lora.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses, started = [], time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        starts = torch.randint(0, len(train) - seq_length, (cfg.batch,), generator=gen)
        x = torch.stack([train[s:s + seq_length] for s in starts.tolist()]).to(device)
        loss = distillation_kl(model, plan, lora, x, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
            log(f"fine-tune step {step + 1}/{cfg.steps}: KL to the original {losses[-1]:.5f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.eval()
    return lora, {
        "steps": cfg.steps, "rank": cfg.rank, "alpha": cfg.alpha, "lr": cfg.lr, "batch": cfg.batch,
        "weight_decay": cfg.weight_decay, "seq_length": seq_length, "tokens": cfg.steps * cfg.batch * seq_length,
        "trainable_parameters": sum(p.numel() for p in params), "walltime_s": time.perf_counter() - started,
        "kl_first": losses[0] if losses else None, "kl_last": losses[-1] if losses else None,
        "kl_curve": [losses[i] for i in range(0, len(losses), max(1, len(losses) // 20))],
    }


@torch.no_grad()
def heldout_kl(model, plan: CQILPlan | None, lora: LoRA | None, tokens: torch.Tensor, seq_length: int,
               vocab: int, batch: int = 8) -> float:
    """KL(original ‖ concurrent model) per token over non-overlapping held-out windows: how far the
    concurrent model's predictions are from the original's, the quantity the fine-tune minimises."""
    device = next(model.parameters()).device
    n = (len(tokens) // seq_length) * seq_length
    windows = tokens[:n].view(-1, seq_length)
    total, count = 0.0, 0
    for rows in windows.split(batch):
        x = rows.to(device)
        total += distillation_kl(model, plan, lora, x, vocab).item() * x.numel()
        count += x.numel()
    return total / count
