"""``suite compare CURRENT BASELINE``: the regression gate between two result sets.

Variants pair by (scenario, variant), taking the latest record of each side; within a pair, the
records' ``measures`` pair by (name, point), so a variable-shape run is compared at equal schedule
position (V-cycle phase, kept length), never through one pooled spread. How each measure is judged
(bootstrap interval of the median ratio, mean difference with its standard error, fixed tolerance)
is in ``suite.report.gate``; this module applies it to whole records:

* "not comparable": the resolved configurations differ (``config_hash``); the differing keys are
  listed and the pair fails, unless ``--allow-config-change``. Environment differences (GPU,
  driver, CUDA, torch, megatron-core) are shown, not judged.
* REGRESSION: a measure regressed; the current variant failed, diverged or was interrupted (also a
  variant the baseline lacks: a crash is never information only); it is missing from CURRENT, or
  skipped there while the baseline ran it; a time-to-target run no longer reaches its target.
* IMPROVEMENT: a measure improved beyond its minimum effect, or the variant failed in the baseline
  and runs now: the run passes, but the stored baseline should be refreshed.
* same; "new" for a variant only CURRENT has.

A baseline may hold several runs of a variant (records appended to one file): its latest run is the
reference, and the spread of the runs with the same configuration sets each measure's run-to-run
noise floor (``gate.noise_floors``; for tolerance measures, their range: ``gate.value_ranges``).

Exit status: 1 when any pair is a regression or not comparable, else 0; 2 for bad input.
"""
from __future__ import annotations

import json
import math
import re

from suite.errors import UserError
from suite.report import fmt, gate
from suite.report.gate import IMPROVEMENT, NEW, REGRESSION, SAME, Limits
from suite.records import latest_by_variant
from suite.scenario.schema import NO_DEFAULT, default_at
from suite.report.select import failure, load_latest, load_records

NOT_COMPARABLE, SKIPPED = "not comparable", "skipped"
FAILED_STATUSES = ("failed", "diverged", "interrupted")
ENV_KEYS = (("gpu_name", "GPU"), ("gpu_count", "GPUs"), ("driver", "driver"), ("cuda", "CUDA"),
            ("torch", "torch"), ("megatron_core", "megatron-core"), ("nccl", "NCCL"), ("python", "Python"))


def parse_percent(text: str, option: str = "--max-slowdown") -> float:
    """'5%' or '5' -> 0.05. Anything else, and ambiguous bare fractions like '0.05', is a UserError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*", str(text))
    if not m:
        raise UserError(f"{option} {text!r} is not a percentage.",
                        fix=f"write a non-negative percentage such as {option} 5% (or 5).")
    value = float(m.group(1))
    if not m.group(2) and 0 < value < 1:
        raise UserError(f"{option} {text!r} is ambiguous: a fraction, or {value:g}%?",
                        fix=f"write {option} {value * 100:g}% for {value * 100:g} percent, "
                            f"or {option} {value:g}% if you mean {value:g} percent.")
    if not math.isfinite(value):
        raise UserError(f"{option} {text!r} is not finite.", fix=f"write a percentage such as {option} 5%.")
    return value / 100


def parse_amount(text, option: str, example: str) -> float:
    """A finite, non-negative number given on the command line (NaN, inf and negatives refused)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or value < 0:
        raise UserError(f"{option} {text!r} is not a finite non-negative number.",
                        fix=f"give it as e.g. {option} {example}.")
    return value


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _canonical(v):
    """A config value as JSON text that does not tell 16 from 16.0 (a typed table coerces what the
    TOML wrote; both are the same setting)."""
    def norm(x):
        if isinstance(x, float) and x.is_integer():
            return int(x)
        if isinstance(x, (list, tuple)):
            return [norm(y) for y in x]
        if isinstance(x, dict):
            return {k: norm(y) for k, y in x.items()}
        return x
    return json.dumps(norm(v), sort_keys=True)


def config_diff(cur: dict, base: dict, limit: int = 6) -> list[str]:
    """'key: baseline -> current' for the resolved-config keys that differ (the first `limit`). A key
    only one side holds, at its schema default on that side (plug-in tables included), is no difference:
    a schema that gained a key keeps its stored baselines comparable. Numbers compare by value."""
    c, b = _flatten(cur.get("config")), _flatten(base.get("config"))
    unset = object()  # a key one side lacks differs from one it holds as null

    def text(v):
        return "unset" if v is unset else json.dumps(v)

    def differs(k):
        cv, bv = c.get(k, unset), b.get(k, unset)
        if (cv is unset) != (bv is unset):
            lacking, held = (c, bv) if cv is unset else (b, cv)
            parent = k.rpartition(".")[0]
            if "." in parent and not any(key.startswith(parent + ".") for key in lacking):
                return True  # a plug-in table only one side has: a technique switched on at its defaults is a change
            default = default_at(k)
            return default is NO_DEFAULT or _canonical(held) != _canonical(default)
        return _canonical(cv) != _canonical(bv)
    keys = [k for k in dict.fromkeys([*b, *c]) if differs(k)]
    lines = [f"{k}: {text(b.get(k, unset))} -> {text(c.get(k, unset))}" for k in keys[:limit]]
    stored = isinstance(cur.get("config"), dict) and isinstance(base.get("config"), dict)
    if not stored and cur.get("config_hash") != base.get("config_hash"):
        lines = [f"config_hash {base.get('config_hash')} -> {cur.get('config_hash')} (no stored config to compare)"]
    return lines + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])


def same_config(a: dict, b: dict) -> bool:
    """Equal hashes, or stored configs equal up to keys a newer schema added at their defaults."""
    if a.get("config_hash") == b.get("config_hash"):
        return True
    return not config_diff(a, b)


def _status_text(rec: dict) -> str:
    status, error = rec.get("status"), rec.get("error") or {}
    if status == "failed":
        return failure(rec)
    if status == "diverged":
        return "diverged" + (f" at step {error['step']}" if error.get("step") is not None else "")
    message = (error.get("message") or "").strip().splitlines()
    return f"{status}" + (f": {message[0]}" if message else "")


def target_measures(rec: dict) -> list[dict]:
    """Time and FLOPs to the quality target of a run that stops there (``metrics.target``): whole-run
    numbers, one per run, so they compare on the minimum effect alone."""
    target = (rec.get("metrics") or {}).get("target")
    if not isinstance(target, dict) or target.get("target_loss") is None:
        return []
    out = []
    for name, unit, kind, key in (("walltime_to_target", "s", "time", "walltime_s"),
                                  ("flops_to_target", "FLOPs", "count", "flops")):
        value = target.get(key) if target.get("reached") else None
        m = {"name": name, "unit": unit, "kind": kind, "direction": "lower", "compare": "median",
             "point": {"target_loss": round(float(target["target_loss"]), 6)}, "value": value}
        if value is None:
            m["reason"] = "target not reached"
        out.append(m)
    return out


def whole_run_time(cur: list[dict], base: list[dict]) -> tuple[list[dict], list[dict]]:
    """Whole-run walltime, gated on the minimum effect, for pairs that have no gated time measure:
    schema-1 records of variable-shape runs kept one pooled step spread, which the reader does not turn
    into a step_time measure (it would mix schedule with noise); the same configuration runs the same
    schedule, so the sum of its step times compares like for like."""
    if any(m.get("kind") == "time" and gate.is_gated(m) for m in cur + base):
        return [], []
    def pick(measures):
        return [{**m, "compare": "median", "samples": None, "summary": None} for m in measures
                if m.get("name") == "walltime" and m.get("kind") == "time" and not (m.get("point") or {})]
    return pick(cur), pick(base)


def baseline_repeats(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The successful runs of each (scenario, variant) in the baseline that share the configuration of
    its latest record: the repeats a run-to-run noise floor is estimated from."""
    latest = latest_by_variant(records)
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        key = (r["scenario"], r["variant"])
        if r.get("status") == "ok" and same_config(r, latest[key]):
            out.setdefault(key, []).append(r)
    return out


def _machine(rec: dict) -> str | None:
    """The machine boot a record ran on (``env.boot_id``; None in records from before it was kept)."""
    return (rec.get("env") or {}).get("boot_id")


def judge_variant(cur: dict | None, base: dict | None, limits: Limits, allow_config_change: bool,
                  repeats: list[dict] | None = None) -> dict:
    """One pair of records: a variant-level kind and verdict, and the per-measure rows; ``repeats``:
    the baseline's runs of this configuration (their spread sets each measure's noise floor)."""
    out = {"kind": SAME, "verdict": "", "rows": [], "config": []}
    if cur is None:
        return {**out, "kind": REGRESSION, "verdict": "REGRESSION: missing in current"}
    if cur.get("status") in FAILED_STATUSES or cur.get("status") not in ("ok", "skipped"):
        return {**out, "kind": REGRESSION, "verdict": f"REGRESSION: {_status_text(cur)}"}
    if cur.get("status") == "skipped":
        if base is None or base.get("status") != "ok":
            return {**out, "kind": SKIPPED, "verdict": _status_text(cur)}
        return {**out, "kind": REGRESSION, "verdict": f"REGRESSION: ran in baseline, {_status_text(cur)}"}
    if base is None:
        return {**out, "kind": NEW, "verdict": "new (no baseline)"}
    if base.get("status") != "ok":
        return {**out, "kind": IMPROVEMENT, "verdict": f"IMPROVEMENT: runs now (baseline {_status_text(base)})"}
    if not same_config(cur, base):
        out["config"] = config_diff(cur, base)
        if not allow_config_change:
            return {**out, "kind": NOT_COMPARABLE, "verdict": "NOT COMPARABLE: resolved config differs"}
    cur_m, base_m = cur.get("measures") or [], base.get("measures") or []
    cur_w, base_w = whole_run_time(cur_m, base_m)
    runs = [(r.get("measures") or []) + whole_run_time(r.get("measures") or [], [])[0] + target_measures(r)
            for r in repeats or []]
    rows = gate.judge_measures(cur_m + cur_w + target_measures(cur), base_m + base_w + target_measures(base), limits,
                               gate.noise_floors(runs), gate.value_ranges(runs))
    machines = {_machine(r) for r in repeats or []}
    if repeats and None not in machines:
        for row in rows:
            if "baseline runs" in row["method"]:
                row["method"] += f" on {len(machines)} machine{'s' * (len(machines) > 1)}"
        out["floor_from_other_machine"] = len(machines) == 1 and _machine(cur) not in machines
    kinds = {r["kind"] for r in rows}
    kind = REGRESSION if REGRESSION in kinds else IMPROVEMENT if IMPROVEMENT in kinds else SAME
    verdict = {REGRESSION: "REGRESSION", IMPROVEMENT: "IMPROVEMENT", SAME: "same"}[kind]
    if out["config"]:
        verdict += " (config changed, compared as allowed)"
    return {**out, "kind": kind, "verdict": verdict, "rows": rows}


def compare(current: dict, baseline: dict, limits: Limits, allow_config_change: bool = False,
            repeats: dict | None = None) -> list[dict]:
    """One result per (scenario, variant) on either side: baseline order first, then new ones."""
    keys = list(baseline) + [k for k in current if k not in baseline]
    return [{"name": f"{k[0]}/{k[1]}", **judge_variant(current.get(k), baseline.get(k), limits, allow_config_change,
                                                        (repeats or {}).get(k))}
            for k in keys]


def env_differences(current: dict, baseline: dict) -> list[str]:
    """'torch: 2.11.0 (baseline) -> 2.12.0 (current)' for each environment key whose values differ, then the
    environment variables set differently (``variable_differences``)."""
    def values(records, key):
        return list(dict.fromkeys(str(r["env"].get(key)) for r in records.values()
                                  if isinstance(r.get("env"), dict) and r["env"].get(key) is not None))
    lines = []
    for key, label in ENV_KEYS:
        cur, base = values(current, key), values(baseline, key)
        if cur and base and set(cur) != set(base):
            lines.append(f"{label}: {', '.join(base)} (baseline) -> {', '.join(cur)} (current)")
    return lines + variable_differences(current, baseline)


def variable_differences(current: dict, baseline: dict) -> list[str]:
    """'TORCHINDUCTOR_CPP_WRAPPER: unset (baseline) -> 1 (current)' for each kernel-, memory- or communication-
    changing environment variable (``env.variables``) set differently on the two sides; records from before
    the variables were kept say nothing, so a side without any such record is not compared."""
    def kept(records):
        return [r["env"]["variables"] for r in records.values()
                if isinstance(r.get("env"), dict) and isinstance(r["env"].get("variables"), dict)]

    cur, base = kept(current), kept(baseline)
    if not cur or not base:
        return []
    lines = []
    for name in sorted({n for v in cur + base for n in v}):
        cur_values = list(dict.fromkeys(v.get(name, "unset") for v in cur))
        base_values = list(dict.fromkeys(v.get(name, "unset") for v in base))
        if set(cur_values) != set(base_values):
            lines.append(f"{name}: {', '.join(base_values)} (baseline) -> {', '.join(cur_values)} (current)")
    return lines


def _value(x, unit: str) -> str:
    if x is None:
        return fmt.NA
    if unit == "bytes":
        return f"{x / 2**30:.2f} GiB"
    if unit == "FLOPs":
        return f"{fmt.count(x)} FLOPs"
    return f"{fmt.sig(float(x), 4)} {unit}".rstrip()


def _change(row: dict) -> str:
    if row["change"] is None:
        return fmt.NA
    if row["relative"]:
        text = fmt.percent(row["change"], signed=True)
        if row["low"] is not None:
            text += f" [{fmt.percent(row['low'], signed=True)}, {fmt.percent(row['high'], signed=True)}]"
        return text
    text = fmt.fixed(row["change"], 4, signed=True)
    if row["low"] is not None:
        text += f" [{fmt.fixed(row['low'], 4, signed=True)}, {fmt.fixed(row['high'], 4, signed=True)}]"
    return text


def method_line(limits: Limits) -> str:
    level = f"{gate.LEVEL * 100:g}%"
    tolerance = (f"±{limits.tolerance * 100:g}% for every tolerance measure" if limits.tolerance is not None
                 else "each measure's own tolerance")
    return (f"Method: medians by a percentile bootstrap of the median ratio ({gate.RESAMPLES} resamples, "
            f"seed {gate.SEED}, {level} interval; without samples, the median's SE from p10-p90 and n); "
            f"means by their difference ± {level} normal interval (paired where both sides scored the same "
            f"items; detectable effect at {gate.POWER * 100:g}% power); fixed tolerances: {tolerance}. "
            f"A change counts when its interval excludes no change and it exceeds the minimum effect: slowdown "
            f"{limits.max_slowdown * 100:g}%, loss +{limits.max_loss_increase:g}, accuracy "
            f"-{limits.max_acc_drop * 100:g} points. Rate measures follow from time and are not gated.")


def summary(results: list[dict]) -> str:
    n = {k: sum(r["kind"] == k for r in results)
         for k in (REGRESSION, NOT_COMPARABLE, IMPROVEMENT, SAME, NEW, SKIPPED)}
    failed = n[REGRESSION] + n[NOT_COMPARABLE]
    text = (f"{'FAIL' if failed else 'PASS'}: {n[REGRESSION]} regression(s), {n[NOT_COMPARABLE]} not comparable, "
            f"{n[IMPROVEMENT]} improvement(s), {n[SAME]} same, {n[NEW]} new, {n[SKIPPED]} skipped.")
    if n[IMPROVEMENT]:
        text += " Improvements: refresh the stored baseline."
    return text


def render(results: list[dict], env_lines: list[str], limits: Limits, current_path: str,
           baseline_path: str) -> str:
    parts = [f"Current: {current_path} · Baseline: {baseline_path}"]
    if env_lines:
        parts.append("Environment differs (timings may not compare):\n" + "\n".join(f"- {l}" for l in env_lines))
    changed = [r for r in results if r["config"]]
    if changed:
        parts.append("Resolved configs differ" + ("" if all(r["kind"] != NOT_COMPARABLE for r in changed) else
                                                  " (not comparable; --allow-config-change compares them anyway)")
                     + ":\n" + "\n".join(f"- {r['name']}: " + "; ".join(r["config"]) for r in changed))
    headers = ["variant", "measure", "point", "baseline", "current", f"change [{gate.LEVEL * 100:g}% interval]",
               "method", "verdict"]
    cells, notes = [], []
    for r in results:
        if not r["rows"]:
            cells.append([r["name"], "-", "-", "", "", "", "", r["verdict"]])
        for row in r["rows"]:
            cells.append([r["name"], row["name"], row["point"], _value(row["base"], row["unit"]),
                          _value(row["cur"], row["unit"]), _change(row), row["method"], row["verdict"]])
            if row["note"]:
                notes.append(f"- {r['name']} {row['name']} ({row['point']}): {row['note']}")
    parts.append(fmt.table(headers, cells, "lllrrrll"))
    if notes:
        parts.append("Too small to decide:\n" + "\n".join(notes))
    elsewhere = [r["name"] for r in results if r.get("floor_from_other_machine")]
    if elsewhere:
        parts.append("One machine: the baseline runs of " + ", ".join(elsewhere) + " all come from one machine and "
                     "this run from another, so their noise floors hold no machine-to-machine difference (host "
                     "speed, clocks). Host-bound measures can differ by more between machines; append nights "
                     "from other machines to the baseline (README, run-to-run noise).")
    parts += [method_line(limits), summary(results)]
    return "\n\n".join(parts) + "\n"


def compare_command(args) -> int:
    limits = Limits(max_slowdown=parse_percent(args.max_slowdown),
                    max_loss_increase=parse_amount(args.max_loss_increase, "--max-loss-increase", "0.01"),
                    max_acc_drop=parse_percent(args.max_acc_drop, "--max-acc-drop"),
                    tolerance=None if args.tolerance is None else parse_percent(args.tolerance, "--tolerance"))
    baseline_records = load_records(args.baseline)
    current, baseline = load_latest([args.current]), latest_by_variant(baseline_records)
    repeats = baseline_repeats(baseline_records)
    results = compare(current, baseline, limits, args.allow_config_change, repeats)
    text = render(results, env_differences(current, baseline), limits, args.current,
                  " + ".join(args.baseline))
    fmt.emit(text, None)
    if args.output:
        fmt.emit(text, args.output)
    return 1 if any(r["kind"] in (REGRESSION, NOT_COMPARABLE) for r in results) else 0
