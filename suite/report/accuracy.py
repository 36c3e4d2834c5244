"""Accuracy tables (``workload.kind = "accuracy"``): held-out quality of each model a variant scored
(``metrics.accuracy``, suite/workloads/accuracy.py: one block per model, ``original`` first).

One row per (variant, model): perplexity and bits per byte with Δ against the variant's original
model, and the KL of its predictions to the original's where measured; then the zero-shot
multiple-choice tasks. A plug-in that changes the model (``suite.report.plugins``) may claim the
scenario and render its own tables from the same blocks, reusing ``tasks_table``.
"""
from __future__ import annotations

from suite.report import fmt
from suite.report.select import failure, is_ok, metric

NOTE = ("Held-out text: the start of the variant's validation tail, never trained on ({tokens} tokens, rolling "
        "windows of {seq}). ppl: perplexity per token; bits/byte: comparable across tokenizers; Δ ppl: relative "
        "to the variant's original model; KL: per-token KL(original ‖ model) on non-overlapping held-out windows.")
HEADERS = ["variant", "model", "ppl", "bits/byte", "Δ ppl", "KL"]


def is_accuracy(rec: dict) -> bool:
    return ((rec.get("config") or {}).get("workload") or {}).get("kind") == "accuracy"


def model_blocks(rec: dict) -> dict[str, dict]:
    """{model name: block} of the models a record scored (blocks with a held-out loss), in record order."""
    return {name: block for name, block in (metric(rec, "accuracy") or {}).items()
            if isinstance(block, dict) and "perplexity" in block}


def scored_note(records: list[dict], note: str = NOTE) -> str:
    """``note`` with the scored token counts and window lengths of the records' original models."""
    scored = [metric(r, "accuracy", "original") for r in records if is_ok(r)]
    scored = [s for s in scored if s]
    tokens = " / ".join(dict.fromkeys(f"{s['tokens']:,}" for s in scored)) or fmt.NA
    seq = " / ".join(dict.fromkeys(str(s["seq_length"]) for s in scored)) or fmt.NA
    return note.format(tokens=tokens, seq=seq)


def _rows(rec: dict) -> list[list[str]]:
    blocks = model_blocks(rec)
    original = (blocks.get("original") or {}).get("perplexity")
    rows = []
    for name, block in blocks.items():
        delta = None if not original or name == "original" else block["perplexity"] / original - 1
        kl = block.get("kl_to_original")
        rows.append([rec["variant"], name, fmt.sig(block["perplexity"], 5), fmt.fixed(block.get("bpb"), 4),
                     "—" if name == "original" else fmt.percent(delta, 2, signed=True),
                     "—" if name == "original" else fmt.NA if kl is None else f"{kl:.2e}"])
    return rows


def accuracy_section(records: list[dict]) -> list[str]:
    body = []
    for rec in records:
        if not is_ok(rec):
            body.append([rec["variant"], f"**{failure(rec)}**"] + [""] * (len(HEADERS) - 2))
        else:
            body += _rows(rec)
    return ["### Accuracy", fmt.table(HEADERS, body, "ll" + "r" * (len(HEADERS) - 2)),
            scored_note(records)] + tasks_table(records)


def tasks_table(records: list[dict], models=None) -> list[str]:
    """Zero-shot multiple choice ([eval] tasks): one row per variant, model and task. ``models(rec)``:
    [(block name, label)] to show, default every model block under its own name."""
    body = []
    for rec in (r for r in records if is_ok(r)):
        blocks = model_blocks(rec)
        shown = models(rec) if models else [(name, name) for name in blocks]
        for name, label in (x for x in shown if x[0] in blocks):
            for task, t in (blocks[name].get("tasks") or {}).items():
                body.append([rec["variant"], label, task, _with_stderr(t, "acc"), _with_stderr(t, "acc_norm"),
                             fmt.scalar(t.get("n"))])
    if not body:
        return []
    return ["#### Zero-shot multiple choice",
            fmt.table(["variant", "model", "task", "acc", "acc_norm", "examples"], body, "lllrrr"),
            "acc: the choice with the highest log-likelihood is the label; acc_norm: the same per character of "
            "the choice (lm-evaluation-harness's definitions); ± one standard error."]


def _with_stderr(t: dict, key: str) -> str:
    value, stderr = t.get(key), t.get(f"{key}_stderr")
    if value is None:
        return fmt.NA
    return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")
