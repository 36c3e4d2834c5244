"""Cost at equal quality (MLPerf style): how much training each variant needed to reach one
validation loss, read from the validation curves the runner records.

The target is the one the reader asks for (``suite report --target-loss``), else the one the runs
stopped at (``workload.target_loss``,
carried in the records' ``target`` block), else the baseline variant's final validation loss. A
variant reaches it at the first validation whose loss is at or below the target; its cost there is
the curve point's steps, tokens, model FLOPs and training walltime (step times summed, validation
passes excluded). A baseline trained on synthetic tokens sets no default target (its loss measures
no quality).

Start-up (first-step compilation, allocator growth) is paid by every variant but not equally. Records
that carry ``metrics.warmup_walltime_s`` (the time of the first ``workload.warmup_steps`` steps) also
get the walltime without it: the point's walltime minus that time, for points past warm-up, the same
way for every variant. Tables of older records, which lack it, are unchanged (their walltimes include
start-up); in a table that mixes both, an older record's row says "start-up included".

Variants that differ only in ``workload.seed`` are repeats of one configuration: when there are
any, a second table gives each configuration's mean cost over its seeds and the Δ of the means, so
a saving can be read against the seed-to-seed spread (MLPerf averages several runs to a target for
the same reason).
"""
from __future__ import annotations

import json
import statistics

from suite.report import fmt, gate
from suite.report.select import baseline_of, is_ok, metric, relative_change


def target_of(records: list[dict], asked: float | None = None) -> float | None:
    if asked is not None:
        return asked
    for rec in records:
        t = metric(rec, "target", "target_loss")
        if t is not None:
            return t
    base = baseline_of(records)
    if ((base or {}).get("config") or {}).get("data", {}).get("source") == "synthetic":
        return None  # a loss on uniform random tokens says nothing about quality: no default target
    return metric(base, "validation_loss")


def config_key(rec: dict) -> str:
    """The record's configuration apart from ``workload.seed``: equal for repeats of one variant."""
    if not rec.get("config"):  # nothing to compare: a group of its own
        return "variant " + rec["variant"]
    config = json.loads(json.dumps(rec["config"]))
    config.get("workload", {}).pop("seed", None)
    return json.dumps(config, sort_keys=True)


def repeat_groups(records: list[dict]) -> list[list[dict]]:
    """Records grouped by configuration apart from the seed (``config_key``), in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(config_key(rec), []).append(rec)
    return list(groups.values())


def group_name(group: list[dict]) -> str:
    """The shortest variant name of a group: "big_lr" of it, its _seed2 and _seed3."""
    return min((r["variant"] for r in group), key=len)


def without_startup(rec: dict, step, walltime) -> tuple[bool, float | None]:
    """(whether the record measured its start-up, the point's walltime without it): None for a point
    not past warm-up, and (False, None) for records written before ``warmup_walltime_s`` existed."""
    warm = metric(rec, "warmup_walltime_s")
    if warm is None:
        return False, None
    warmup_steps = ((rec.get("config") or {}).get("workload") or {}).get("warmup_steps")
    if None in (step, walltime, warmup_steps) or step <= warmup_steps:
        return True, None
    return True, walltime - warm


def reach(rec: dict, target: float) -> dict | None:
    """The first curve point at or below target: {'step', 'tokens', 'flops', 'walltime_s', 'loss',
    'has_startup', 'walltime_after_startup_s'}."""
    steps, tokens = metric(rec, "steps"), metric(rec, "tokens")
    for point in metric(rec, "validation_curve") or []:
        if len(point) >= 4 and point[1] is not None and point[1] <= target:  # null: a non-finite loss
            step, loss, walltime, flops = point[:4]
            known = None not in (step, tokens) and steps
            has, after = without_startup(rec, step, walltime)
            return {"step": step, "tokens": tokens * step // steps if known else None, "flops": flops,
                    "walltime_s": walltime, "loss": loss, "has_startup": has, "walltime_after_startup_s": after}
    return None


def _pct(new, old) -> float | None:
    change = relative_change(new, old)
    return None if change is None else 100 * change


def quality_rows(records: list[dict], asked: float | None = None) -> tuple[float | None, list[dict]]:
    ok = [r for r in records if is_ok(r)]
    target = target_of(records, asked)
    # only runs that tracked quality over time (a target, or validations during training)
    tracked = any(metric(r, "target") or len(metric(r, "validation_curve") or []) >= 2 for r in ok)
    has_cost = any(len(p) >= 4 for r in ok for p in (metric(r, "validation_curve") or []))
    if target is None or not (tracked and has_cost):
        return target, []
    base = baseline_of(records)
    base_hit = reach(base, target) if is_ok(base) else None
    rows = []
    for rec in ok:
        hit = reach(rec, target)
        rows.append({
            "variant": rec["variant"], "baseline": rec is base, "reached": hit is not None,
            **(hit or {}),
            "delta_flops_pct": None if not (hit and base_hit) else _pct(hit["flops"], base_hit["flops"]),
            "delta_walltime_pct": None if not (hit and base_hit) else _pct(hit["walltime_s"], base_hit["walltime_s"]),
            "delta_walltime_after_startup_pct": None if not (hit and base_hit) else
            _pct(hit["walltime_after_startup_s"], base_hit["walltime_after_startup_s"]),
        })
    return target, rows


def quality_section(records: list[dict], asked: float | None = None) -> list[str]:
    target, rows = quality_rows(records, asked)
    if not rows:
        return []
    startup = any(r.get("has_startup") for r in rows)  # both walltimes, only when some record has both
    body = []
    for r in rows:
        name = r["variant"] + (" (baseline)" if r["baseline"] else "")
        if not r["reached"]:
            body.append([name, "not reached"] + [""] * (8 if startup else 6))
            continue
        dash = r["baseline"]
        step = fmt.NA if r["step"] is None else str(r["step"])
        row = [name, step, fmt.count(r["tokens"]), fmt.count(r["flops"]), fmt.fixed(r["walltime_s"], 1)]
        if startup:
            row.append(fmt.fixed(r["walltime_after_startup_s"], 1) if r["has_startup"] else "start-up included")
        row += [fmt.fixed(r["loss"], 4), "—" if dash else fmt.fixed(r["delta_flops_pct"], 1, signed=True, unit="%"),
                "—" if dash else fmt.fixed(r["delta_walltime_pct"], 1, signed=True, unit="%")]
        if startup:
            row.append("—" if dash else fmt.fixed(r["delta_walltime_after_startup_pct"], 1, signed=True, unit="%"))
        body.append(row)
    headers = ["variant", "step", "tokens", "model FLOPs", "walltime (s)"] + \
        (["walltime w/o start-up (s)"] if startup else []) + ["val loss", "Δ FLOPs", "Δ walltime"] + \
        (["Δ walltime w/o start-up"] if startup else [])
    note = ("First validation at or below the target; walltime sums training step times "
            "(validation excluded). A variant validated every N steps can overshoot by up to N steps.")
    if startup:
        note += (" Without start-up: minus the variant's first `warmup_steps` step times "
                 "(`metrics.warmup_walltime_s`), for points past warm-up.")
    return [f"### Cost to reach validation loss {target:.4f}",
            fmt.table(headers, body, "l" + "r" * (len(headers) - 1)), note,
            ] + _seed_means(rows, [r for r in records if is_ok(r)])


def _delta_with_interval(group, base, key: str) -> str:
    """'-34.8% [-41.0%, -28.1%]': mean over the group's seeds against the baseline's, and the interval."""
    values = [row.get(key) for row, _ in group]
    base_values = [row.get(key) for row, _ in base or []]
    if not values or not base_values or None in values or None in base_values:
        return fmt.NA
    text = fmt.percent(relative_change(statistics.mean(values), statistics.mean(base_values)), signed=True)
    interval = gate.ratio_of_means_interval(values, base_values)
    if interval is None:
        return text
    low, high = (fmt.percent(x - 1, signed=True) for x in interval)
    return f"{text} [{low}, {high}]"


def _seed_means(rows: list[dict], records: list[dict]) -> list[str]:
    row_of = {row["variant"]: row for row in rows}
    groups = [[(row_of[r["variant"]], r) for r in g] for g in repeat_groups(records)]
    if all(len(g) == 1 for g in groups):
        return []

    def mean(group, key):  # None unless every seed reached the target
        values = [row.get(key) for row, _ in group]
        return statistics.mean(values) if all(v is not None for v in values) else None

    base = next((g for g in groups if any(row["baseline"] for row, _ in g)), None)
    startup = any(row.get("has_startup") for row in rows)
    body = []
    for g in groups:
        seeds = ", ".join(sorted(str((rec.get("config") or {}).get("workload", {}).get("seed")) for _, rec in g))
        step, flops, wall = mean(g, "step"), mean(g, "flops"), mean(g, "walltime_s")
        walls = [row["walltime_s"] for row, _ in g if row["reached"]]
        spread = f" ({min(walls):.1f}–{max(walls):.1f})" if len(walls) > 1 else ""
        is_base = g is base
        row = [group_name([rec for _, rec in g]) + (" (baseline)" if is_base else ""), seeds,
               f"{sum(row['reached'] for row, _ in g)}/{len(g)}",
               fmt.NA if step is None else f"{step:.0f}",
               fmt.count(flops), fmt.NA if wall is None else f"{wall:.1f}{spread}"]
        if startup:
            after = mean(g, "walltime_after_startup_s")
            row.append(f"{after:.1f}" if after is not None else
                       "start-up included" if not all(r.get("has_startup") for r, _ in g) else fmt.NA)
        row += ["—" if is_base else _delta_with_interval(g, base, "flops"),
                "—" if is_base else _delta_with_interval(g, base, "walltime_s")]
        body.append(row)
    headers = ["configuration", "seeds", "reached", "mean step", "mean model FLOPs", "mean walltime (s)"] + \
        (["mean walltime w/o start-up (s)"] if startup else []) + ["Δ FLOPs", "Δ walltime"]
    return ["Mean over seeds (variants that differ only in `workload.seed`); a mean needs every seed "
            "to reach the target, walltime range in brackets. Δ: the ratio of the means, with its 95% interval "
            "from the seed-to-seed spread of both sides (delta method on the log ratio, Welch's t; "
            "`suite.report.gate.ratio_of_means_interval`) where each side has two or more seeds:",
            fmt.table(headers, body, "ll" + "r" * (len(headers) - 2))]
