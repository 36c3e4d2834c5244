"""What CQIL adds to reports: the layout label of CQIL runs, the accuracy tables of a CQIL plan before
and after its fine-tune, and the decode cut of each CQIL variant next to the ideal one. For schema-1
records, whose ``dp`` field held the CQIL degree, it moves the degree into ``layout.cqil_degree``.

Torch-free (found by the reporter through ``suite.registry.report_modules``).
"""
from __future__ import annotations

from suite.records import DICT, INT, LIST
from suite.report import fmt
from suite.report.accuracy import is_accuracy, scored_note, tasks_table
from suite.report.latency import point_name
from suite.report.plugins import ReportPlugin, register
from suite.report.select import failure, is_ok, metric

FIELDS = {"metrics.cqil": DICT, **{f"metrics.cqil.{k}": INT + "!" for k in ("degree", "bypass", "depth")},
          "metrics.cqil.layers_per_gpu": INT, "metrics.cqil.groups": LIST, "layout.cqil_degree": INT,
          "metrics.accuracy.finetune": DICT,
          **{f"metrics.accuracy.finetune.{k}": "number!" for k in ("steps", "batch", "seq_length", "rank",
                                                                   "trainable_parameters", "walltime_s")}}


def _planned(rec: dict) -> bool:
    return bool(((rec.get("config") or {}).get("parallel") or {}).get("cqil"))


def upgrade_v1(rec: dict) -> None:
    """Schema 1 wrote dp = world / (tp·pp), which for a CQIL run is the CQIL degree."""
    if _planned(rec) and isinstance(rec.get("dp"), int) and rec["dp"] > 1:
        rec["layout"].update(dp=1, cqil_degree=rec["dp"])


def layout_label(rec: dict) -> str | None:
    degree = (rec.get("layout") or {}).get("cqil_degree")
    return f"tp{rec.get('tp')} × cqil{degree}" if degree else None


# ------------------------------------------------------------------------------------------- accuracy

NOTE = ("Held-out text: the start of the variant's validation tail, never trained on ({tokens} tokens, rolling "
        "windows of {seq}). ppl: perplexity per token; bits/byte: comparable across tokenizers; Δ: relative "
        "to the original model's perplexity; KL: per-token KL(original ‖ CQIL model) on non-overlapping "
        "held-out windows (what the fine-tune minimises, on training text). Ideal cut: the share of layers CQIL "
        "takes off the critical path, the most latency it can save.")
HEADERS = ["variant", "CQIL", "ideal cut", "ppl", "bits/byte", "Δ ppl", "KL", "ppl after fine-tune",
           "Δ ppl after", "KL after", "fine-tune"]
MODELS = {"original": "original", "concurrent": "CQIL", "finetuned": "CQIL after fine-tune"}


def _quality(block: dict | None, original: float | None) -> list[str]:
    if not block:
        return [fmt.NA, fmt.NA, fmt.NA]
    delta = None if not original else block["perplexity"] / original - 1
    return [fmt.sig(block["perplexity"], 5), fmt.percent(delta, 2, signed=True),
            fmt.NA if block.get("kl_to_original") is None else f"{block['kl_to_original']:.2e}"]


def _row(rec: dict) -> list[str]:
    acc = metric(rec, "accuracy") or {}
    original, concurrent = acc.get("original") or {}, acc.get("concurrent")
    plan, layers = metric(rec, "cqil"), ((rec.get("config") or {}).get("model") or {}).get("num_layers")
    cqil = fmt.NA if not plan else f"degree {plan['degree']}, bypass {plan['bypass']}, depth {plan['depth']}/{layers}"
    ideal = fmt.NA if not plan or not layers else fmt.percent(1 - plan["depth"] / layers)
    shown = concurrent or original
    ppl, delta, kl = _quality(concurrent, original.get("perplexity")) if concurrent else \
        [fmt.sig(original["perplexity"], 5) if original else fmt.NA, "—", "—"]
    after = _quality(acc.get("finetuned"), original.get("perplexity"))
    tune = acc.get("finetune")
    tuned = fmt.NA if not tune else (f"{tune['steps']} steps × {tune['batch']} × {tune['seq_length']}, "
                                     f"LoRA r{tune['rank']} ({fmt.count(tune['trainable_parameters'])}), "
                                     f"{tune['walltime_s']:.0f} s")
    return [rec["variant"], cqil, ideal, ppl, fmt.fixed(shown.get("bpb"), 4), delta, kl,
            after[0], after[1], after[2], tuned]


def _models(rec: dict) -> list[tuple[str, str]]:
    """CQIL variants show their CQIL models; the others their original one."""
    acc = metric(rec, "accuracy") or {}
    names = ["concurrent", "finetuned"] if "concurrent" in acc else ["original"]
    return [(name, MODELS[name]) for name in names]


def accuracy_body(records: list[dict]) -> list[str] | None:
    """The accuracy section of a scenario in which some variant runs a CQIL plan."""
    if not any(is_accuracy(r) and (_planned(r) or metric(r, "cqil")) for r in records):
        return None
    body = []
    for rec in records:
        if not is_ok(rec):
            body.append([rec["variant"], f"**{failure(rec)}**"] + [""] * (len(HEADERS) - 2))
        else:
            body.append(_row(rec))
    return ["### Accuracy", fmt.table(HEADERS, body, "ll" + "r" * (len(HEADERS) - 3) + "l"),
            scored_note(records, NOTE)] + tasks_table(records, _models)


# ------------------------------------------------------------------------------------------- latency


def _cut(r: dict) -> str:
    """The measured decode cut, −Δ decode, with the Δ's noise mark."""
    if r["delta_decode_pct"] is None:
        return fmt.NA
    return fmt.fixed(-r["delta_decode_pct"], 1, unit="%") + (" (noise)" if r["delta_decode_noise"] else "")


def decode_cut_lines(records: list[dict], ctx: dict) -> list[str]:
    """Per CQIL variant of an inference scenario: its plan, the ideal decode cut 1 − depth/L and the
    measured one per point (``ctx["latency_rows"]``, the core latency rows)."""
    rows = ctx.get("latency_rows") or []
    lines = []
    for rec in records:
        plan = metric(rec, "cqil") if is_ok(rec) else None
        if not plan or "inference" not in (rec.get("metrics") or {}):
            continue
        layers = ((rec.get("config") or {}).get("model") or {}).get("num_layers")
        ideal = fmt.NA if not layers else fmt.percent(1 - plan["depth"] / layers)
        measured = ", ".join(
            f"{_cut(r)} at {point_name((r['batch'], r['prompt'], r['gen'], r['cuda_graph']))}"
            for r in rows if r["variant"] == rec["variant"] and not r["baseline"]) or fmt.NA
        lines.append(f"- {rec['variant']}: CQIL degree {plan['degree']}, bypass {plan['bypass']}, "
                     f"sequential depth {plan['depth']} of {layers} layers ({plan.get('layers_per_gpu')} per GPU); "
                     f"ideal decode cut {ideal}, measured {measured}")
    if not lines:
        return []
    return ["Decode cut of CQIL (1 − decode time / baseline's; ideal: 1 − depth / layers):\n" + "\n".join(lines)]


register(ReportPlugin("cqil", upgrade_v1=upgrade_v1, fields=FIELDS, layout_label=layout_label,
                      body=accuracy_body, sections=decode_cut_lines))
