"""Accuracy workload: held-out quality of a model and of its parallel mode's form, before and after recovery.

One process (a parallel mode computes its model's function on one device, ``ParallelMode.accuracy``;
the latency of the same layout is the inference workload's business). The model comes from
``[model] init`` (a ``suite`` checkpoint or a Hugging Face LLaMA directory), the text from ``[data]``.
Measured on the start of the validation tail (``[eval] heldout_max_tokens`` tokens, rolling windows
of ``workload.seq_length``, as ``suite.eval.metrics.heldout_text`` scores training runs):

    original        loss, perplexity, bits per byte of the unmodified model
    <form>          the same of each form the variant's parallel mode measures (e.g. the model whose layers
                    run side by side, and that model after a recovery fine-tune), with ``kl_to_original``:
                    the per-token KL(original ‖ that form) over non-overlapping held-out windows; a block
                    that is not a model's (e.g. the fine-tune's settings, tokens and KL curve) sits beside them

With ``[eval] text`` each block also holds ``text``: perplexity per token and bits per byte of that file
(``suite.eval.metrics.file_text``). Each block also holds ``tasks``, per ``[eval] tasks`` file, its zero-shot
multiple-choice acc and acc_norm (with standard errors and the number of examples). Without a parallel
mode only ``original`` is measured (an evaluation of the checkpoint).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from suite import registry
from suite.data.prepare import text_tokenizer
from suite.data.tokens import TokenSource
from suite.eval.metrics import file_text, heldout_max_tokens, heldout_text, multiple_choice, read_examples
from suite.metrics import flops as F
from suite.metrics.collect import peak_memory
from suite.models.build import build
from suite.workloads.measures import accuracy_measures

def _logprobs(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Log-probs [b, s, vocab] of the unmodified one-process model (padded vocabulary rows cut)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return torch.log_softmax(model(tokens, positions, None)[..., :vocab].float(), dim=-1)


def run(spec, ctx, fault=lambda step: None) -> dict:
    model = build(spec, log=ctx.log, inference=True).model
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    vocab, seq = spec.model.vocab_size, spec.workload.seq_length
    data = TokenSource(spec)
    started = time.perf_counter()
    tasks = {Path(t).stem: read_examples(Path(spec.file).parent / t) for t in spec.eval.tasks}
    tokenizer = text_tokenizer(spec) if tasks or spec.eval.text else None
    heldout = data.valid[:heldout_max_tokens(spec) + 1]  # the tokens heldout_text scores

    def quality(logprobs, kl=None) -> dict:
        """Held-out text metrics, per task acc / acc_norm (not per example) of the model ``logprobs``
        (tokens -> log-probs) computes and, given ``kl`` (held-out tokens -> KL to the original), that KL."""
        scorer = torch.no_grad()(logprobs)
        block = heldout_text(spec, scorer, data.valid)
        samples = block["samples"] = {"heldout": block.pop("window_losses")}  # to the measures (metrics())
        if spec.eval.text:  # [eval] text: any UTF-8 file, e.g. a standard test set
            block["text"] = file_text(spec, scorer, tokenizer)
            samples["text"] = block["text"].pop("window_losses")
        if tasks:
            scored = {name: multiple_choice(scorer, tokenizer, ex, max_length=seq) for name, ex in tasks.items()}
            block["tasks"] = {name: {k: v for k, v in r.items() if k not in ("loglikelihoods", "per_example")}
                              for name, r in scored.items()}
            samples["tasks"] = {name: r["per_example"] for name, r in scored.items()}
        if kl is not None:
            block["kl_to_original"] = kl(heldout)
        return block

    device = next(model.parameters()).device
    out = {"original": quality(lambda tokens: _logprobs(model, tokens.to(device), vocab))}
    ctx.log(f"original: perplexity {out['original']['perplexity']:.3f}")
    for name, cfg in spec.modes.items():
        mode = registry.PARALLEL_MODES[name]
        if mode.accuracy:
            out.update(mode.accuracy(spec, cfg, model, quality, data, ctx, fault))
    out["walltime_s"] = time.perf_counter() - started
    out["modes"] = registry.mode_blocks(spec)
    return out


def metrics(raw: dict, spec, ctx) -> dict:
    peak, kind = peak_memory()
    # per-example correctness goes to the measures, not into the summary blocks
    blocks = {k: v for k, v in raw.items() if k != "modes"}  # the models' blocks, the fine-tune's, walltime_s
    samples = {k: v.pop("samples", None) for k, v in blocks.items() if isinstance(v, dict) and "samples" in v}
    out = {"parameters": F.parameters(F.Shape.of(spec.model))["total"], "world_size": ctx.world,
           "peak_memory_bytes": int(peak), "memory_kind": kind, **raw["modes"],
           "accuracy": blocks, "extra": {}}
    out["measures"] = accuracy_measures(out, samples)
    return out
