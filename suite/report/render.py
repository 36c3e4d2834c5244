"""``suite report RESULTS...``: one comparison table per scenario, one row per variant.

Every format starts from the same flat rows (``build_rows``): raw numbers, one per record, keyed by flat
column names. Markdown formats them for reading; csv and json write them as they are. The latest
record of each (scenario, variant) wins, so a re-run supersedes an earlier one.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from suite.records import latest_by_variant
from suite.report import fmt, plugins
from suite.report.accuracy import accuracy_section, is_accuracy, model_blocks
from suite.report.latency import is_inference, latency_rows, latency_section
from suite.report.measures import pooled_over_positions, positions_section
from suite.report.plots import loss_curves
from suite.report.quality import quality_section, target_of
from suite.report.select import (baseline_of, by_scenario, failure, is_ok, load_records, machine, metric,
                                 relative_change, step_half_spread_s, step_median_s, superseded)

NOISE_NOTE = ("Step time: median ± half the p10–p90 spread of the timed steps; "
              "differences smaller than the step-time spread are noise. "
              "Δ columns are relative to the baseline variant.")
SCALING_NOTE = ("Scaling: tokens/s per GPU as a share of the baseline's tokens/s per GPU (100% = each added GPU "
                "adds the baseline's throughput per GPU; the same global batch, so a layout that splits it also "
                "splits the work per GPU).")
RSS_NOTE = "† host peak RSS (CPU run), not device memory."
POOLED_NOTE = ("‡ pooled over the schedule's positions (the step shape changes): the spread is the schedule, "
               "not noise; compare per position (table below).")
HELDOUT_NOTE = ("Held-out ppl and bits/byte: the final model on the start of the validation tail ({tokens} tokens, "
                "rolling windows of the sequence length); perplexity = exp(loss in nats/token), bits per UTF-8 "
                "byte of the scored text compare across tokenizers.")


def flatten(prefix: str, value) -> dict:
    """{'extra.fp8.recipe': ...} from nested dicts; lists (curves) are left out of tables."""
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}", sub))
        return out
    return {} if isinstance(value, list) else {prefix: value}


def measure_columns(rec: dict) -> dict:
    """Every declared measure's value as one flat column, 'measure.NAME[.KEY=VALUE...] (UNIT)': csv and
    json carry what the record declares without naming any measure (samples stay in the record)."""
    out = {}
    for m in rec.get("measures") or []:
        if isinstance(m, dict) and m.get("name"):
            key = "measure." + m["name"] + "".join(f".{k}={v}" for k, v in (m.get("point") or {}).items())
            out[f"{key} ({m['unit']})" if m.get("unit") else key] = m.get("value")
    return out


def _scaled(value, factor: float):
    # Rounded so csv/json show 73.4, not 73.39999999999999; still far finer than any measurement.
    return None if value is None else round(value * factor, 6)


def variant_row(rec: dict, base: dict) -> dict:
    """One record as flat raw values, with its Δ against the scenario's baseline record."""
    env = rec.get("env") or {}
    median = step_median_s(rec)
    base_val, val = metric(base, "validation_loss"), metric(rec, "validation_loss")
    row = {
        "scenario": rec["scenario"], "variant": rec["variant"], "baseline": rec is base,
        "status": rec.get("status"), "error": None if is_ok(rec) else failure(rec),
        "tp": rec.get("tp"), "pp": rec.get("pp"), "dp": rec.get("dp"), "world_size": rec.get("world_size"),
        "parameters": metric(rec, "parameters"), "tokens": metric(rec, "tokens"),
        "step_time_median_ms": _scaled(median, 1e3),
        "step_time_half_spread_ms": _scaled(step_half_spread_s(rec), 1e3),
        "step_time_pooled": pooled_over_positions(rec),
        "tokens_per_s": metric(rec, "tokens_per_s"), "tflops_per_gpu": metric(rec, "tflops_per_gpu"),
        "flops_total": metric(rec, "flops_total"), "walltime_s": metric(rec, "walltime_s"),
        "scaling": _scaling(rec, base),
        "mfu": metric(rec, "mfu"), "fraction_of_gemm_ceiling": metric(rec, "fraction_of_gemm_ceiling"),
        "peak_memory_bytes": metric(rec, "peak_memory_bytes"), "memory_kind": metric(rec, "memory_kind"),
        "final_loss": metric(rec, "final_loss"), "validation_loss": val, "energy_j": metric(rec, "energy_j"),
        "delta_step_time_pct": _scaled(relative_change(median, step_median_s(base)), 100),
        "delta_flops_per_step_pct": _scaled(relative_change(metric(rec, "flops_per_step"),
                                                            metric(base, "flops_per_step")), 100),
        "delta_flops_total_pct": _scaled(relative_change(metric(rec, "flops_total"),
                                                         metric(base, "flops_total")), 100),
        "delta_walltime_pct": _scaled(relative_change(metric(rec, "walltime_s"), metric(base, "walltime_s")), 100),
        "delta_validation_loss": None if val is None or base_val is None else round(val - base_val, 6),
        "machine": machine(rec.get("env")), "torch": env.get("torch"), "megatron_core": env.get("megatron_core"),
        "git_commit": env.get("git_commit"), "date": (rec.get("finished_at") or rec.get("started_at") or "")[:10],
    }
    row.update(flatten("heldout", metric(rec, "heldout") or {}))  # only where measured, as target.* / extra.*
    for model, block in model_blocks(rec).items():  # the accuracy workload's blocks, likewise
        row.update(flatten(model, block))
    row.update(flatten("target", metric(rec, "target") or {}))
    if metric(rec, "warmup_walltime_s") is not None:  # training records since it was added
        row["warmup_walltime_s"] = metric(rec, "warmup_walltime_s")
    row.update(measure_columns(rec))
    row.update(flatten("extra", metric(rec, "extra") or {}))
    return row


def _scaling(rec: dict, base: dict) -> float | None:
    """Tokens/s per GPU over the baseline's tokens/s per GPU (None without both throughputs)."""
    tps, base_tps = metric(rec, "tokens_per_s"), metric(base, "tokens_per_s")
    n, base_n = rec.get("world_size"), base.get("world_size")
    if not (tps and base_tps and n and base_n):
        return None
    return (tps / n) / (base_tps / base_n)


def build_rows(latest: dict) -> list[dict]:
    """Flat rows of every scenario, each scenario's baseline first; inference scenarios add one row per
    latency point after their variant rows ("row": "latency")."""
    out = []
    for recs in by_scenario(latest).values():
        base = baseline_of(recs)
        out += [variant_row(r, base) for r in recs]
        if any(is_inference(r) for r in recs):
            out += latency_rows(recs)
    return out


# Markdown: (header, cell) per fixed column. Failed rows fill the first three, then the error.
def _memory(r):
    if r["peak_memory_bytes"] is None:
        return fmt.NA
    return fmt.fixed(r["peak_memory_bytes"], 2, 2 ** -30) + (" †" if r["memory_kind"] == "cpu_max_rss" else "")


def _step_time(r):
    if r["step_time_median_ms"] is None:
        return fmt.NA
    return (f"{fmt.fixed(r['step_time_median_ms'], 1)} ± {fmt.fixed(r['step_time_half_spread_ms'], 1)}"
            + (" ‡" if r["step_time_pooled"] else ""))


def _delta(key: str, cell):
    """Δ cells: a dash on the baseline row itself."""
    return lambda r: "—" if r["baseline"] else cell(r[key])


COLUMNS = [
    ("variant", lambda r: r["variant"] + (" (baseline)" if r["baseline"] else "")),
    ("parallelism", lambda r: f"tp{r['tp']} pp{r['pp']} dp{r['dp']}"),
    ("GPUs", lambda r: str(r["world_size"])),
    ("parameters", lambda r: fmt.count(r["parameters"])),
    ("tokens", lambda r: fmt.count(r["tokens"])),
    ("step time (ms)", _step_time),
    ("tokens/s", lambda r: fmt.count(r["tokens_per_s"])),
    ("TFLOP/s per GPU", lambda r: fmt.NA if r["tflops_per_gpu"] is None else fmt.sig(r["tflops_per_gpu"])),
    ("MFU", lambda r: fmt.percent(r["mfu"])),
    ("of GEMM ceiling", lambda r: fmt.percent(r["fraction_of_gemm_ceiling"])),
    ("peak memory (GiB)", _memory),
    ("final loss", lambda r: fmt.fixed(r["final_loss"], 4)),
    ("val loss", lambda r: fmt.fixed(r["validation_loss"], 4)),
    ("energy (kJ)", lambda r: fmt.fixed(r["energy_j"], 1, 1e-3)),
    ("Δ step time", _delta("delta_step_time_pct", lambda v: fmt.fixed(v, 1, signed=True, unit="%"))),
    ("Δ FLOPs/step", _delta("delta_flops_per_step_pct", lambda v: fmt.fixed(v, 1, signed=True, unit="%"))),
    ("Δ FLOPs (run)", _delta("delta_flops_total_pct", lambda v: fmt.fixed(v, 1, signed=True, unit="%"))),
    ("Δ walltime (run)", _delta("delta_walltime_pct", lambda v: fmt.fixed(v, 1, signed=True, unit="%"))),
    ("Δ val loss", _delta("delta_validation_loss", lambda v: fmt.fixed(v, 4, signed=True))),
]
FIXED_CELLS_OF_FAILED = 3  # variant, parallelism, GPUs: known from the record even when it failed
# after "val loss", in tables where some record measured them (metrics.heldout)
HELDOUT_COLUMNS = [
    ("held-out ppl", lambda r: fmt.fixed(r.get("heldout.perplexity"), 2)),
    ("bits/byte", lambda r: fmt.fixed(r.get("heldout.bpb"), 4)),
]


SCALING_COLUMN = ("scaling", lambda r: fmt.percent(r["scaling"]))


def _columns(rows: list[dict]) -> list:
    """The fixed columns, with scaling when the table's variants use different GPU counts and the
    held-out ones when any row has them."""
    columns = COLUMNS
    if _gpu_counts_differ(rows):
        columns = _insert_after(columns, "tokens/s", [SCALING_COLUMN])
    if _has_heldout(rows):
        columns = _insert_after(columns, "val loss", HELDOUT_COLUMNS)
    return columns


def _insert_after(columns: list, header: str, extra: list) -> list:
    at = [h for h, _ in columns].index(header) + 1
    return columns[:at] + extra + columns[at:]


def _gpu_counts_differ(rows: list[dict]) -> bool:
    return len({r["world_size"] for r in rows if r["error"] is None and r["world_size"]}) > 1


def _has_heldout(rows: list[dict]) -> bool:
    return any(r.get("heldout.perplexity") is not None for r in rows)


def _optional_columns(rows: list[dict]) -> list[str]:
    """target.* then extra.* keys that any row of this table carries, each in first-seen order."""
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith(("target.", "extra.")))
    return sorted(keys, key=lambda k: not k.startswith("target."))


def _cells(row: dict, columns: list, optional: list[str]) -> list[str]:
    if row["error"] is not None:
        known = [cell(row) for _, cell in columns[:FIXED_CELLS_OF_FAILED]]
        blanks = len(columns) + len(optional) - FIXED_CELLS_OF_FAILED - 1
        return known + [f"**{row['error']}**"] + [""] * blanks
    return [cell(row) for _, cell in columns] + [fmt.scalar(row.get(k)) for k in optional]


def _distinct(rows: list[dict], key: str, show=str) -> str:
    """The different values of `key` in a table (records may come from several runs), or 'unknown'."""
    values = dict.fromkeys(show(r[key]) for r in rows if r[key])
    return ", ".join(values) or "unknown"


def _short_commit(commit: str) -> str:
    """First 12 hex digits, keeping a '-dirty' mark (uncommitted changes were measured)."""
    sha, _, rest = commit.partition("-")
    return sha[:12] + (f"-{rest}" if rest else "")


def _header(rows: list[dict]) -> str:
    """Machine, software versions, commit and date(s) of the records of one table."""
    dates = sorted({r["date"] for r in rows if r["date"]})
    when = "unknown date" if not dates else dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return (f"{_distinct(rows, 'machine')} · torch {_distinct(rows, 'torch')} · "
            f"megatron-core {_distinct(rows, 'megatron_core')} · "
            f"commit {_distinct(rows, 'git_commit', _short_commit)} · {when}")


def _kind(rec: dict) -> str:
    return ((rec.get("config") or {}).get("workload") or {}).get("kind") or "train"


def _section(scenario: str, records: list[dict], output: Path | None, target_loss: float | None = None) -> list[str]:
    """Heading and header line of one scenario, then one part per workload kind its variants ran
    (training, inference, accuracy), in the order they first appear; each part compares its variants
    with its own baseline (the scenario's, where it is of that kind)."""
    families: dict[str, list[dict]] = {}
    for r in records:
        families.setdefault(_kind(r), []).append(r)
    parts = [f"## {scenario}", _header([variant_row(r, baseline_of(records)) for r in records])]
    for kind, recs in families.items():
        heading = ["### Training"] if kind == "train" and len(families) > 1 else []
        parts += heading + _family(scenario, recs, output, target_loss)
    return parts


def _family(scenario: str, records: list[dict], output: Path | None, target_loss: float | None) -> list[str]:
    """The tables and notes of variants of one workload kind (inference: the latency tables; accuracy: the
    accuracy tables); training: its table, with a quality section its loss-curve plot (a PNG beside
    `output`, the markdown file); then what plug-ins add (``suite.report.plugins``), or a plug-in's own
    tables for variants it claims."""
    ctx, base = {}, baseline_of(records)
    rows = [variant_row(r, base) for r in records]
    if any(is_inference(r) for r in records):
        return latency_section(records, ctx) + plugins.sections(records, ctx)
    claimed = plugins.body(records)
    if claimed:
        return claimed + plugins.sections(records, ctx)
    if any(is_accuracy(r) for r in records):
        return accuracy_section(records) + plugins.sections(records, ctx)
    columns, optional = _columns(rows), _optional_columns(rows)
    headers = [h for h, _ in columns] + optional
    table = fmt.table(headers, [_cells(r, columns, optional) for r in rows], "ll" + "r" * (len(headers) - 2))
    notes = [NOISE_NOTE] + ([RSS_NOTE] if any(r["memory_kind"] == "cpu_max_rss" for r in rows) else []) + \
        ([POOLED_NOTE] if any(r["step_time_pooled"] and r["error"] is None for r in rows) else [])
    if _gpu_counts_differ(rows):
        notes.append(SCALING_NOTE)
    if _has_heldout(rows):
        scored = dict.fromkeys(f"{r['heldout.tokens']:,}" for r in rows if r.get("heldout.tokens") is not None)
        notes.append(HELDOUT_NOTE.format(tokens=" / ".join(scored) or "n/a"))
    quality = quality_section(records, target_loss)
    plot = loss_curves(scenario, records, target_of(records, target_loss), output) if quality else []
    return [table, "\n".join(notes)] + positions_section(records) + quality + plot + \
        plugins.sections(records, ctx)


def command_line(sources, output: Path | None, target_loss: float | None) -> str:
    """The `suite report` command that renders this report again (the paths as they were given)."""
    words = ["python -m suite report", *map(str, sources)]
    words += [f"--target-loss {target_loss:g}"] if target_loss is not None else []
    return " ".join(words + ([f"-o {output}"] if output else []))


def markdown(latest: dict, sources, output: Path | None = None, target_loss: float | None = None,
             earlier: dict | None = None) -> str:
    """The report; `output`, the file it will be written to, is where plots go (none without it), and
    a report written to a file names the command that renders it again; `target_loss` overrides the
    loss the equal-quality tables compare at; `earlier`: the superseded record counts
    (``select.superseded``), named so that no run is left out silently."""
    parts = ["# Benchmark report", f"Records: {', '.join(map(str, sources))}"]
    if output is not None:
        parts.append(f"Rendered by: `{command_line(sources, output, target_loss)}`")
    if earlier:
        runs = ", ".join(f"{scenario}/{variant} ({n})" for (scenario, variant), n in earlier.items())
        parts.append(f"Re-run variants: the tables show each one's latest record; earlier records not shown: {runs}.")
    for scenario, records in by_scenario(latest).items():
        parts += _section(scenario, records, output, target_loss)
    return "\n\n".join(parts) + "\n"


def to_csv(rows: list[dict]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))  # optional columns differ per row
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def report_command(args) -> int:
    fmt.check_output(args.output)
    records = load_records(args.results)
    latest = latest_by_variant(records)
    if args.format == "csv":
        text = to_csv(build_rows(latest))
    elif args.format == "json":
        text = to_json(build_rows(latest))
    else:
        text = markdown(latest, args.results, Path(args.output) if args.output else None, args.target_loss,
                        superseded(records))
    fmt.emit(text, args.output)
    return 0
