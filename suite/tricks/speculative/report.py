"""What speculative decoding adds to reports: per variant and point, the draft's acceptance, tokens per
verify step and ms per generated token beside the baseline's decode ms/token at the same point, and
its FLOPs against plain greedy decoding (the core latency table already holds its TTFT and ms/token
with the Δ; this table says why).

Torch-free (found by the reporter through ``suite.registry.report_modules``).
"""
from __future__ import annotations

import json

from suite.records import BOOL, DICT, INT, LIST, NUM, STR
from suite.report import fmt
from suite.report.plugins import ReportPlugin, register
from suite.report.select import is_ok, metric

BLOCK = "metrics.speculative"
FIELDS = {BLOCK: LIST, f"{BLOCK}[]": DICT + "!", f"{BLOCK}[].draft": STR + "!",
          **{f"{BLOCK}[].{k}": INT + "!" for k in ("batch", "prompt", "gen", "k")}, f"{BLOCK}[].draft_parameters": INT,
          f"{BLOCK}[].cuda_graph": BOOL,
          **{f"{BLOCK}[].{k}": NUM for k in ("verify_steps", "acceptance_rate", "accepted_rate_per_sequence",
                                             "tokens_per_verify", "ms_per_token_median", "verify_step_ms_median",
                                             "ttft_ms_median", "flops_draft", "flops_verify", "flops_prefill",
                                             "flops_total", "flops_greedy", "flops_per_token", "distinct_4grams")},
          f"{BLOCK}[].same_tokens_across_repeats": BOOL}

HEADERS = ["variant", "GPUs", "draft", "k", "batch", "prompt", "gen", "decode", "acceptance", "per sequence",
           "tokens/verify", "distinct-4", "verify step (ms)", "ms/token", "plain ms/token", "speed-up",
           "FLOPs vs greedy"]
NOTE = ("Speculative decoding (greedy acceptance; the output is the target's greedy output token for token). "
        "draft: 'layers:N' (the model's first N layers) or a second model (its parameters); acceptance: accepted "
        "draft tokens / proposed, the batch verified in lockstep (per sequence: each sequence's own accepted "
        "length); tokens/verify: tokens emitted per verify step (accepted + 1); distinct-4: distinct 4-grams over "
        "4-grams of the output (near 0: greedy decoding looping on itself, which any draft predicts: read "
        "acceptance with it); ms/token: median over timed "
        "requests of decode time / generated tokens; decode: eager, or the draft and verify forwards in CUDA "
        "graphs; plain ms/token: plain greedy decoding of the same model (a variant of the same [model] without "
        "a draft or a parallel mode) at the same point and decode mode; speed-up: plain / speculative ms/token; "
        "FLOPs vs greedy: model FLOPs of the "
        "request (draft and verify forwards, prefills) over plain greedy decoding's. A draft with random weights "
        "agrees with a random target by chance only: its acceptance says nothing about a trained pair. GPUs: a "
        "variant with a parallel mode (CQIL) lays the target over several GPUs and decodes speculatively on "
        "them: beside the CQIL variant alone and speculative decoding alone, it shows what the two buy together.")


def _model_key(rec: dict) -> str:
    return json.dumps((rec.get("config") or {}).get("model"), sort_keys=True)


def _plain_ms(records: list[dict]) -> dict[tuple, float]:
    """{(model, batch, prompt, gen, graph): decode ms/token} of plain greedy decoding on one process: the
    variants that decode without a draft or a parallel mode, by their [model] (a scenario may hold several
    targets, e.g. random 7B weights and a trained pair)."""
    out = {}
    for rec in records:
        config = rec.get("config") or {}
        if not is_ok(rec) or "speculative" in (config.get("tricks") or {}) or rec.get("world_size") != 1:
            continue
        for e in metric(rec, "inference") or []:
            if e.get("decode_ms_median") is not None:
                out.setdefault((_model_key(rec), e["batch"], e["prompt"], e["gen"], bool(e.get("cuda_graph"))),
                               e["decode_ms_median"])
    return out


def _row(rec: dict, e: dict, ref: float | None) -> list[str]:
    mine, greedy, step = e.get("ms_per_token_median"), e.get("flops_greedy"), e.get("verify_step_ms_median")
    draft = e["draft"] + (f" ({fmt.count(e['draft_parameters'])})" if e.get("draft_parameters") else "")
    point = [str(e[k]) for k in ("k", "batch", "prompt", "gen")] + ["graph" if e.get("cuda_graph") else "eager"]
    return [rec["variant"], str(rec.get("world_size")), draft, *point,
            fmt.percent(e.get("acceptance_rate")), fmt.percent(e.get("accepted_rate_per_sequence")),
            fmt.fixed(e.get("tokens_per_verify"), 2), fmt.fixed(e.get("distinct_4grams"), 2),
            fmt.NA if step is None else fmt.sig(step),
            fmt.NA if mine is None else fmt.sig(mine), fmt.NA if ref is None else fmt.sig(ref),
            fmt.NA if not ref or not mine else f"{ref / mine:.2f}×",
            fmt.NA if not greedy or e.get("flops_total") is None else f"{e['flops_total'] / greedy:.2f}×"]


def speculative_lines(records: list[dict], ctx: dict) -> list[str]:
    """The speculative table of an inference scenario (nothing when no variant decodes speculatively)."""
    plain = _plain_ms(records)
    body = [_row(rec, e, plain.get((_model_key(rec), e["batch"], e["prompt"], e["gen"], bool(e.get("cuda_graph")))))
            for rec in records if is_ok(rec) for e in metric(rec, "speculative") or []]
    if not body:
        return []
    align = "lrlr" + "r" * 3 + "l" + "r" * (len(HEADERS) - 8)
    return ["### Speculative decoding", fmt.table(HEADERS, body, align), NOTE]


register(ReportPlugin("speculative", fields=FIELDS, sections=speculative_lines))
