"""Accuracy tables (``workload.kind = "accuracy"``): held-out quality of a model and of its CQIL form
before and after the LoRA + distillation fine-tune (``metrics.accuracy``, suite/workloads/accuracy.py).

One row per variant: its CQIL plan and the latency cut that plan allows at best (1 − depth / layers;
the inference workload measures the real one), perplexity and bits per byte with Δ against the
original model, the KL of its predictions to the original's, and the fine-tune's size and cost.
"""
from __future__ import annotations

from suite.report import fmt
from suite.report.select import failure, is_ok, metric

NOTE = ("Held-out text: the start of the variant's validation tail, never trained on ({tokens} tokens, rolling "
        "windows of {seq}). ppl: perplexity per token; bits/byte: comparable across tokenizers; Δ: relative "
        "to the original model's perplexity; KL: per-token KL(original ‖ CQIL model) on non-overlapping "
        "held-out windows (what the fine-tune minimises, on training text). Ideal cut: the share of layers CQIL "
        "takes off the critical path, the most latency it can save.")

HEADERS = ["variant", "CQIL", "ideal cut", "ppl", "bits/byte", "Δ ppl", "KL", "ppl after fine-tune",
           "Δ ppl after", "KL after", "fine-tune"]


def is_accuracy(rec: dict) -> bool:
    return ((rec.get("config") or {}).get("workload") or {}).get("kind") == "accuracy"


def _quality(block: dict | None, original: float | None) -> list[str]:
    if not block:
        return [fmt.NA, fmt.NA, fmt.NA]
    delta = None if not original else block["perplexity"] / original - 1
    return [fmt.sig(block["perplexity"], 5), fmt.percent(delta, 2, signed=True),
            fmt.NA if block.get("kl_to_original") is None else f"{block['kl_to_original']:.2e}"]


def _row(rec: dict) -> list[str]:
    acc = metric(rec, "accuracy")
    original, concurrent = acc["original"], acc.get("concurrent")
    plan, layers = metric(rec, "cqil"), rec["config"]["model"]["num_layers"]
    cqil = fmt.NA if not plan else f"degree {plan['degree']}, bypass {plan['bypass']}, depth {plan['depth']}/{layers}"
    ideal = fmt.NA if not plan else fmt.percent(1 - plan["depth"] / layers)
    shown = concurrent or original
    ppl, delta, kl = _quality(concurrent, original["perplexity"]) if concurrent else \
        [fmt.sig(original["perplexity"], 5), "—", "—"]
    after = _quality(acc.get("finetuned"), original["perplexity"])
    tune = acc.get("finetune")
    tuned = fmt.NA if not tune else (f"{tune['steps']} steps × {tune['batch']} × {tune['seq_length']}, LoRA r{tune['rank']} "
                                     f"({fmt.count(tune['trainable_parameters'])}), {tune['walltime_s']:.0f} s")
    return [rec["variant"], cqil, ideal, ppl, fmt.fixed(shown.get("bpb"), 4), delta, kl,
            after[0], after[1], after[2], tuned]


def accuracy_section(records: list[dict]) -> list[str]:
    body = []
    for rec in records:
        if not is_ok(rec):
            body.append([rec["variant"], f"**{failure(rec)}**"] + [""] * (len(HEADERS) - 2))
        else:
            body.append(_row(rec))
    scored = [metric(r, "accuracy", "original") for r in records if is_ok(r)]
    tokens = " / ".join(dict.fromkeys(f"{s['tokens']:,}" for s in scored)) or fmt.NA
    seq = " / ".join(dict.fromkeys(str(s["seq_length"]) for s in scored)) or fmt.NA
    return ["### Accuracy", fmt.table(HEADERS, body, "ll" + "r" * (len(HEADERS) - 3) + "l"),
            NOTE.format(tokens=tokens, seq=seq)] + _tasks_table(records)


PHASES = {"original": "original", "concurrent": "CQIL", "finetuned": "CQIL after fine-tune"}


def _tasks_table(records: list[dict]) -> list[str]:
    """Zero-shot multiple choice ([eval] tasks): one row per variant, model and task."""
    body = []
    for rec in (r for r in records if is_ok(r)):
        acc = metric(rec, "accuracy")
        phases = ["concurrent", "finetuned"] if "concurrent" in acc else ["original"]
        for phase in (p for p in phases if p in acc):
            for task, t in (acc[phase].get("tasks") or {}).items():
                body.append([rec["variant"], PHASES[phase], task, f"{t['acc']:.4f} ± {t['acc_stderr']:.4f}",
                             f"{t['acc_norm']:.4f} ± {t['acc_norm_stderr']:.4f}", str(t["n"])])
    if not body:
        return []
    return ["#### Zero-shot multiple choice",
            fmt.table(["variant", "model", "task", "acc", "acc_norm", "examples"], body, "lllrrr"),
            "acc: the choice with the highest log-likelihood is the label; acc_norm: the same per character of "
            "the choice (lm-evaluation-harness's definitions); ± one standard error."]
