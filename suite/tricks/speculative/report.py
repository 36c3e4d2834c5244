"""What speculative decoding adds to reports: per variant and point, the draft's acceptance, tokens per
verify step and ms per generated token beside the baseline's decode ms/token at the same point, and
its FLOPs against plain greedy decoding (the core latency table already holds its TTFT and ms/token
with the Δ; this table says why).

Torch-free (found by the reporter through ``suite.registry.report_modules``).
"""
from __future__ import annotations

from suite.records import BOOL, DICT, INT, LIST, NUM, STR
from suite.report import fmt
from suite.report.plugins import ReportPlugin, register
from suite.report.select import is_ok, metric

BLOCK = "metrics.speculative"
FIELDS = {BLOCK: LIST, f"{BLOCK}[]": DICT + "!", f"{BLOCK}[].draft": STR + "!",
          **{f"{BLOCK}[].{k}": INT + "!" for k in ("batch", "prompt", "gen", "k")}, f"{BLOCK}[].draft_parameters": INT,
          **{f"{BLOCK}[].{k}": NUM for k in ("verify_steps", "acceptance_rate", "accepted_rate_per_sequence",
                                             "tokens_per_verify", "ms_per_token_median", "verify_step_ms_median",
                                             "ttft_ms_median", "flops_draft", "flops_verify", "flops_prefill",
                                             "flops_total", "flops_greedy", "flops_per_token")},
          f"{BLOCK}[].same_tokens_across_repeats": BOOL}

HEADERS = ["variant", "GPUs", "draft", "k", "batch", "prompt", "gen", "acceptance", "per sequence", "tokens/verify",
           "verify step (ms)", "ms/token", "baseline ms/token", "speed-up", "FLOPs vs greedy"]
NOTE = ("Speculative decoding (greedy acceptance; the output is the target's greedy output token for token). "
        "draft: 'layers:N' (the model's first N layers) or a second model (its parameters); acceptance: accepted "
        "draft tokens / proposed, the batch verified in lockstep (per sequence: each sequence's own accepted "
        "length); tokens/verify: tokens emitted per verify step (accepted + 1); ms/token: median over timed "
        "requests of decode time / generated tokens; baseline ms/token: the baseline variant's eager decode step "
        "at the same point; speed-up: baseline / speculative ms/token; FLOPs vs greedy: model FLOPs of the "
        "request (draft and verify forwards, prefills) over plain greedy decoding's. A draft with random weights "
        "agrees with a random target by chance only: its acceptance says nothing about a trained pair. GPUs: a "
        "variant with a parallel mode (CQIL) lays the target over several GPUs and decodes speculatively on "
        "them: beside the CQIL variant alone and speculative decoding alone, it shows what the two buy together.")


def _baseline_ms(ctx: dict) -> dict[tuple, float]:
    return {(r["batch"], r["prompt"], r["gen"]): r["decode_ms_median"] for r in ctx.get("latency_rows") or []
            if r["baseline"] and not r["cuda_graph"] and r["decode_ms_median"] is not None}


def _row(rec: dict, e: dict, ref: float | None) -> list[str]:
    mine, greedy, step = e.get("ms_per_token_median"), e.get("flops_greedy"), e.get("verify_step_ms_median")
    draft = e["draft"] + (f" ({fmt.count(e['draft_parameters'])})" if e.get("draft_parameters") else "")
    point = [str(e[k]) for k in ("k", "batch", "prompt", "gen")]
    return [rec["variant"], str(rec.get("world_size")), draft, *point,
            fmt.percent(e.get("acceptance_rate")), fmt.percent(e.get("accepted_rate_per_sequence")),
            fmt.fixed(e.get("tokens_per_verify"), 2), fmt.NA if step is None else fmt.sig(step),
            fmt.NA if mine is None else fmt.sig(mine), fmt.NA if ref is None else fmt.sig(ref),
            fmt.NA if not ref or not mine else f"{ref / mine:.2f}×",
            fmt.NA if not greedy or e.get("flops_total") is None else f"{e['flops_total'] / greedy:.2f}×"]


def speculative_lines(records: list[dict], ctx: dict) -> list[str]:
    """The speculative table of an inference scenario (nothing when no variant decodes speculatively)."""
    base = _baseline_ms(ctx)
    body = [_row(rec, e, base.get((e["batch"], e["prompt"], e["gen"])))
            for rec in records if is_ok(rec) for e in metric(rec, "speculative") or []]
    if not body:
        return []
    return ["### Speculative decoding", fmt.table(HEADERS, body, "lrlr" + "r" * (len(HEADERS) - 4)), NOTE]


register(ReportPlugin("speculative", fields=FIELDS, sections=speculative_lines))
