"""Latency tables for inference scenarios (``workload.kind = "inference"``).

An inference record has no training numbers; its ``metrics.inference`` holds one entry per (batch,
prompt, gen, cuda_graph) point (see suite/workloads/inference.py). Here each point becomes one flat
row: time to first token, decode ms/token, throughput, bandwidth, MFU, the graph check, and the
latency cut Δ against the baseline variant at the same point. Plug-ins label their layouts and add
their own lines below the tables (``suite.report.plugins``), from the rows computed here.

Noise: a run's relative spread is half its p10–p90 spread over its median; a Δ smaller than the
larger of the two runs' spreads is marked "(noise)" (as in ``suite compare``).
"""
from __future__ import annotations

from suite.report import fmt
from suite.report.plugins import layout_label
from suite.report.select import baseline_of, failure, is_ok, metric, relative_change

NOTE = ("TTFT: time to first token (prefill + first greedy token), median ± half the p10–p90 spread of the "
        "timed requests. Decode: one step, one new token per sequence. Decode bandwidth: bytes a step must "
        "read per step time, as a share of the measured copy bandwidth of all GPUs. Repeats agree: every "
        "request of the point gave the same greedy tokens (no: not bitwise repeatable; from token k: where "
        "they first part). Graph check (CUDA-graph rows): greedy tokens equal to eager / max relative logits "
        "difference of one decode step. "
        "Δ: relative to the baseline variant at the same (batch, prompt, gen, eager|graph) point, negative "
        "is faster; (noise): smaller than the larger of the two runs' relative spreads.")
DIFFERS_NOTE = ("Differs from token k: the first generated position whose greedy token differs from the "
                "reference's (0: already the prefill's token). The logits difference beside it does not depend "
                "on that: it compares one decode step both ways from the same prefill state and input token.")
NOISE_NOTE = ("1-ulp noise: the same eager step with every layer's output moved by one ulp of its dtype (random "
              "signs), from the same state: the yardstick for the logits difference beside it; a difference of that "
              "order is rounding, one far above it is not.")
COMPILED_NOTE = ("Decode 'compiled': the step ran under torch.compile ([model] kernels = 'compile'), compiled before "
                 "the timed requests; its graph check compares it with a plain eager request of the same point.")


def is_inference(rec: dict) -> bool:
    return ((rec.get("config") or {}).get("workload") or {}).get("kind") == "inference"


def point_key(entry: dict) -> tuple:
    return entry["batch"], entry["prompt"], entry["gen"], bool(entry.get("cuda_graph"))


def point_name(key: tuple) -> str:
    batch, prompt, gen, graph = key
    return f"b{batch} p{prompt} g{gen} {'graph' if graph else 'eager'}"


def _half_spread(entry: dict, phase: str) -> float | None:
    p10, p90 = entry.get(f"{phase}_ms_p10"), entry.get(f"{phase}_ms_p90")
    return None if p10 is None or p90 is None else round((p90 - p10) / 2, 6)


def _relative_spread(entry: dict | None, phase: str) -> float | None:
    half = None if entry is None else _half_spread(entry, phase)
    median = None if entry is None else entry.get(f"{phase}_ms_median")
    return None if half is None or not median else half / median


def _delta(entry: dict, base: dict | None, phase: str) -> tuple[float | None, bool]:
    """(Δ median in %, whether it is within noise) of one phase ('prefill' or 'decode')."""
    if base is None:
        return None, False
    change = relative_change(entry.get(f"{phase}_ms_median"), base.get(f"{phase}_ms_median"))
    if change is None:
        return None, False
    spreads = [s for s in (_relative_spread(entry, phase), _relative_spread(base, phase)) if s is not None]
    return round(100 * change, 6), bool(spreads) and abs(change) < max(spreads)


def _points(rec: dict) -> dict[tuple, dict]:
    return {point_key(e): e for e in metric(rec, "inference") or []}


def latency_rows(records: list[dict]) -> list[dict]:
    """One flat row per (variant, point) of the scenario's successful inference records, baseline first."""
    base = baseline_of(records)
    base_points = _points(base) if is_ok(base) else {}
    rows = []
    for rec in records:
        if not (is_ok(rec) and is_inference(rec)):
            continue
        for key, e in _points(rec).items():
            ref = None if rec is base else base_points.get(key)
            delta_decode, decode_noise = _delta(e, ref, "decode")
            delta_prefill, prefill_noise = _delta(e, ref, "prefill")
            rows.append({
                "row": "latency", "scenario": rec["scenario"], "variant": rec["variant"], "baseline": rec is base,
                "layout": layout_label(rec), "world_size": rec.get("world_size"),
                "batch": key[0], "prompt": key[1], "gen": key[2], "cuda_graph": key[3], "repeats": e.get("repeats"),
                "compiled": bool(e.get("compiled")), "decode_compile_s": e.get("decode_compile_s"),
                "ttft_ms_median": e.get("prefill_ms_median"), "ttft_ms_half_spread": _half_spread(e, "prefill"),
                "ttft_ms_p99": e.get("prefill_ms_p99"),
                "decode_ms_median": e.get("decode_ms_median"), "decode_ms_half_spread": _half_spread(e, "decode"),
                "decode_ms_p90": e.get("decode_ms_p90"), "decode_ms_p99": e.get("decode_ms_p99"),
                "prefill_tokens_per_s": e.get("prefill_tokens_per_s"),
                "decode_tokens_per_s": e.get("decode_tokens_per_s"),
                "decode_bandwidth_fraction": e.get("decode_bandwidth_fraction"), "prefill_mfu": e.get("prefill_mfu"),
                "repeats_same_tokens": e.get("repeats_same_tokens"),
                "repeats_differ_from": e.get("repeats_differ_from"),
                "same_tokens_as_eager": e.get("same_tokens_as_eager"),
                "tokens_differ_from": e.get("tokens_differ_from"),
                "graph_logits_rel_diff": e.get("graph_logits_rel_diff"),
                "graph_noise_rel_diff": e.get("graph_noise_rel_diff"),
                "delta_decode_pct": delta_decode, "delta_decode_noise": decode_noise,
                "delta_prefill_pct": delta_prefill, "delta_prefill_noise": prefill_noise,
            })
    return rows


# ---------------------------------------------------------------------------------------------- markdown


def _ms(x: float | None) -> str:
    return fmt.NA if x is None else fmt.sig(x)


def _ttft(r: dict) -> str:
    if r["ttft_ms_median"] is None:
        return fmt.NA
    median, half = _ms(r["ttft_ms_median"]), r["ttft_ms_half_spread"]
    decimals = len(median.partition(".")[2])  # the spread to the median's precision
    return median + ("" if half is None else f" ± {fmt.fixed(half, decimals)}")


def _graph_check(r: dict) -> str:
    if not (r["cuda_graph"] or r["compiled"]):
        return "—"
    same = {True: "same", False: "differs", None: fmt.NA}[r["same_tokens_as_eager"]]
    if r.get("tokens_differ_from") is not None:  # records since the field exists
        same += f" from token {r['tokens_differ_from']}"
    diff, noise = r["graph_logits_rel_diff"], r.get("graph_noise_rel_diff")
    if diff is None:
        return same
    return f"{same} / {diff:.1e}" + ("" if noise is None else f" (1-ulp noise {noise:.1e})")


def _delta_cell(r: dict, phase: str) -> str:
    if r["baseline"]:
        return "—"
    value = r[f"delta_{phase}_pct"]
    if value is None:
        return fmt.NA
    return fmt.fixed(value, 1, signed=True, unit="%") + (" (noise)" if r[f"delta_{phase}_noise"] else "")


COLUMNS = [
    ("variant", lambda r: r["variant"] + (" (baseline)" if r["baseline"] else "")),
    ("batch", lambda r: str(r["batch"])),
    ("prompt", lambda r: str(r["prompt"])),
    ("gen", lambda r: str(r["gen"])),
    ("decode", lambda r: ("graph" if r["cuda_graph"] else "eager") + (" compiled" if r["compiled"] else "")),
    ("TTFT (ms)", _ttft),
    ("TTFT p99", lambda r: _ms(r["ttft_ms_p99"])),
    ("decode ms/token", lambda r: _ms(r["decode_ms_median"])),
    ("p90", lambda r: _ms(r["decode_ms_p90"])),
    ("p99", lambda r: _ms(r["decode_ms_p99"])),
    ("prefill tokens/s", lambda r: fmt.count(r["prefill_tokens_per_s"])),
    ("decode tokens/s", lambda r: fmt.count(r["decode_tokens_per_s"])),
    ("decode BW of copy ceiling", lambda r: fmt.percent(r["decode_bandwidth_fraction"])),
    ("prefill MFU", lambda r: fmt.percent(r["prefill_mfu"])),
    ("repeats agree", lambda r: fmt.scalar(r["repeats_same_tokens"]) + (
        "" if r.get("repeats_differ_from") is None else f" from token {r['repeats_differ_from']}")),
    ("graph check", _graph_check),
    ("Δ decode", lambda r: _delta_cell(r, "decode")),
    ("Δ prefill", lambda r: _delta_cell(r, "prefill")),
]


def _variants_table(records: list[dict]) -> str:
    """What the latency rows share per variant: layout, GPUs, size, memory; or why the variant failed."""
    base = baseline_of(records)
    body = []
    for rec in records:
        name = rec["variant"] + (" (baseline)" if rec is base else "")
        fixed = [name, layout_label(rec), str(rec.get("world_size"))]
        if not is_ok(rec):
            body.append(fixed + [f"**{failure(rec)}**", ""])
            continue
        memory = metric(rec, "peak_memory_bytes")
        body.append(fixed + [fmt.count(metric(rec, "parameters")),
                             fmt.NA if memory is None else fmt.fixed(memory, 2, 2 ** -30)])
    return fmt.table(["variant", "layout", "GPUs", "parameters", "peak memory (GiB)"], body, "llrrr")


def _fastest_lines(rows: list[dict]) -> list[str]:
    """Per point, the fastest variant for each GPU count, for decode and for time to first token."""
    lines = []
    for key in dict.fromkeys((r["batch"], r["prompt"], r["gen"], r["cuda_graph"]) for r in rows):
        at = [r for r in rows if (r["batch"], r["prompt"], r["gen"], r["cuda_graph"]) == key]
        phases = []
        for label, column in (("decode", "decode_ms_median"), ("TTFT", "ttft_ms_median")):
            best = {}
            for r in sorted((r for r in at if r[column] is not None), key=lambda r: r[column]):
                best.setdefault(r["world_size"], r)
            if best:
                ordered = sorted(best.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
                phases.append(f"{label}: " + ", ".join(f"{gpus} GPU{'' if gpus == 1 else 's'} {r['variant']} "
                                                       f"{_ms(r[column])} ms" for gpus, r in ordered))
        lines.append(f"- {point_name(key)}: " + "; ".join(phases))
    return ["Fastest per point and GPU count (median):\n" + "\n".join(lines)] if lines else []


def latency_section(records: list[dict], ctx: dict) -> list[str]:
    """Markdown parts of an inference scenario: variants, latency table, notes, fastest per point; the
    rows go to ``ctx["latency_rows"]`` for the plug-ins' sections."""
    rows = ctx["latency_rows"] = latency_rows(records)
    parts = [_variants_table(records)]
    if rows:
        parts += (["### Latency",
                   fmt.table([h for h, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in rows],
                             "lrrrl" + "r" * (len(COLUMNS) - 5)),
                   NOTE] + ([COMPILED_NOTE] if any(r["compiled"] for r in rows) else [])
                  + ([DIFFERS_NOTE] if any(r.get("tokens_differ_from") is not None for r in rows) else [])
                  + ([NOISE_NOTE] if any(r.get("graph_noise_rel_diff") is not None for r in rows) else [])
                  + _fastest_lines(rows))
    return parts
