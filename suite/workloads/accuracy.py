"""Accuracy workload: held-out quality of a model and of its CQIL form, before and after recovery.

One process (the CQIL function is computed on one device, ``suite.parallel.cqil_finetune``; the
latency of the same plan is the inference workload's business). The model comes from
``[model] init`` (a ``suite`` checkpoint or a Hugging Face LLaMA directory), the text from ``[data]``.
Measured on the start of the validation tail (``[eval] heldout_max_tokens`` tokens, rolling windows
of ``workload.seq_length``, as ``suite.eval.metrics.heldout_text`` scores training runs):

    original        loss, perplexity, bits per byte of the unmodified model
    concurrent      the same of the CQIL model (``[parallel] cqil``), and ``kl_to_original``: the
                    per-token KL(original ‖ CQIL model) over non-overlapping held-out windows
    finetuned       the same after ``[parallel.cqil.finetune]`` (LoRA + distillation on the training split)
    finetune        its settings, tokens, trainable parameters, walltime and KL curve

With ``[eval] text`` each block also holds ``text``: perplexity per token and bits per byte of that file
(``suite.eval.metrics.file_text``). Each block also holds ``tasks``, per ``[eval] tasks`` file, its zero-shot multiple-choice acc and acc_norm
(with standard errors and the number of examples). Without CQIL only ``original`` is measured (an
evaluation of the checkpoint).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from suite.data.prepare import text_tokenizer
from suite.data.tokens import TokenSource
from suite.eval.metrics import file_text, heldout_max_tokens, heldout_text, multiple_choice, read_examples
from suite.metrics import flops as F
from suite.metrics.collect import peak_memory
from suite.models.build import build
from suite.parallel import cqil
from suite.parallel.cqil_finetune import finetune, heldout_kl, logprobs
from suite.workloads.measures import accuracy_measures


def _scorer(model, plan, vocab: int):
    """tokens -> log-probs of the model (run as ``plan`` prescribes), as suite.eval's scorers take it."""
    device = next(model.parameters()).device
    return torch.no_grad()(lambda tokens: logprobs(model, tokens.to(device), plan, vocab))


def run(spec, ctx, fault=lambda step: None) -> dict:
    model = build(spec, log=ctx.log, inference=True).model
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    vocab, seq = spec.model.vocab_size, spec.workload.seq_length
    data = TokenSource(spec)
    plan, tune = cqil.plan_of(spec), cqil.finetune_of(spec)
    started = time.perf_counter()
    tasks = {Path(t).stem: read_examples(Path(spec.file).parent / t) for t in spec.eval.tasks}
    tokenizer = text_tokenizer(spec) if tasks or spec.eval.text else None
    heldout = data.valid[:heldout_max_tokens(spec) + 1]  # the tokens heldout_text scores

    def quality(plan, lora=None) -> dict:
        """Held-out text metrics, per task acc / acc_norm (not per example) and, under CQIL, the KL to
        the original model."""
        scorer = _scorer(model, plan, vocab)
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
        if plan is not None:
            block["kl_to_original"] = heldout_kl(model, plan, lora, heldout, seq, vocab)
        return block

    out = {"original": quality(None)}
    ctx.log(f"original: perplexity {out['original']['perplexity']:.3f}")
    if plan is not None:
        out["concurrent"] = quality(plan)
        ctx.log(f"CQIL: perplexity {out['concurrent']['perplexity']:.3f}, "
                f"KL to the original {out['concurrent']['kl_to_original']:.5f}")
        fault(0)
        if tune is not None:
            lora, out["finetune"] = finetune(model, plan, tune, data.train, seq, vocab, spec.workload.seed, ctx.log)
            out["finetuned"] = quality(plan, lora)
            ctx.log(f"CQIL after the fine-tune: perplexity {out['finetuned']['perplexity']:.3f}, "
                    f"KL to the original {out['finetuned']['kl_to_original']:.5f}")
            lora.remove()
    out["walltime_s"] = time.perf_counter() - started
    out["cqil"] = plan.describe() if plan else None
    return out


def metrics(raw: dict, spec, ctx) -> dict:
    peak, kind = peak_memory()
    # per-example correctness goes to the measures, not into the summary blocks
    samples = {k: raw[k].pop("samples", None) for k in ("original", "concurrent", "finetuned") if k in raw}
    out = {"parameters": F.parameters(F.Shape.of(spec.model))["total"], "world_size": ctx.world,
           "peak_memory_bytes": int(peak), "memory_kind": kind, "cqil": raw["cqil"],
           "accuracy": {k: raw[k] for k in ("original", "concurrent", "finetuned", "finetune", "walltime_s")
                        if k in raw},
           "extra": {}}
    out["measures"] = accuracy_measures(out, samples)
    return out
