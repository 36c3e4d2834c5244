"""``suite compare CURRENT BASELINE``: the regression gate between two result sets.

Variants are paired by (scenario, variant), taking the latest record of each side.

Noise. A run's relative noise is half the spread of its central 80% of timed steps, relative to
its median: ``(p90 - p10) / 2 / median``. A pair's noise is the larger of the two runs' values.

Verdicts, per pair:

* REGRESSION when the median step time grew by more than ``--max-slowdown`` AND by more than the
  pair's noise; or when the loss grew by more than ``--max-loss-increase`` (absolute; validation loss
  when both sides have one, else final training loss); or when the current variant failed (even one
  the baseline lacks); or when it is missing from CURRENT.
* IMPROVEMENT, the same tests in the other direction (faster, lower loss), or a variant that failed
  in the baseline and now runs: not a failure, but a sign that the stored baseline should be refreshed.
* same (within noise) otherwise; "new" for a variant only CURRENT has (information only).

``--max-slowdown`` is a percentage: "5%" or "5". A bare number below 1 ("0.05") is refused, since it
reads as a fraction but would mean 0.05%; write "0.05%" if that is meant.

Exit status: 1 when any pair is a regression, else 0 (2 for bad input, via UserError).
"""
from __future__ import annotations

import re

from suite.errors import UserError
from suite.report import fmt
from suite.report.select import (failure, is_ok, load_latest, machine, metric, relative_change,
                                 relative_noise, step_median_s)

REGRESSION, IMPROVEMENT, SAME, NEW = "regression", "improvement", "same", "new"


def parse_percent(text: str, option: str = "--max-slowdown") -> float:
    """'5%' or '5' -> 0.05. Anything else, and ambiguous bare fractions like '0.05', is a UserError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*", str(text))
    if not m:
        raise UserError(f"{option} {text!r} is not a percentage.",
                        fix=f"write a percentage such as {option} 5% (or 5).")
    value = float(m.group(1))
    if not m.group(2) and 0 < value < 1:
        raise UserError(f"{option} {text!r} is ambiguous: a fraction, or {value:g}%?",
                        fix=f"write {option} {value * 100:g}% for {value * 100:g} percent, "
                            f"or {option} {value:g}% if you mean {value:g} percent.")
    return value / 100


def loss_change(cur: dict, base: dict) -> tuple[float | None, str]:
    """Current minus baseline loss: validation when both sides have one, else final training loss."""
    for key, label in (("validation_loss", "val"), ("final_loss", "final")):
        c, b = metric(cur, key), metric(base, key)
        if c is not None and b is not None:
            return c - b, label
    return None, ""


def judge(cur: dict | None, base: dict | None, max_slowdown: float, max_loss: float) -> dict:
    """One comparison row: the numbers and a verdict (kind + text)."""
    out = {"base_s": None, "cur_s": None, "change": None, "noise": None, "loss": None, "loss_kind": ""}
    if cur is None:
        return {**out, "kind": REGRESSION, "verdict": "REGRESSION: missing in current"}
    if not is_ok(cur):  # also for a new variant: a crash is never information only
        return {**out, "base_s": base and step_median_s(base), "kind": REGRESSION,
                "verdict": f"REGRESSION: {failure(cur)}"}
    if base is None:
        return {**out, "cur_s": step_median_s(cur), "kind": NEW, "verdict": "new (no baseline)"}
    if not is_ok(base):
        return {**out, "cur_s": step_median_s(cur), "kind": IMPROVEMENT,
                "verdict": "IMPROVEMENT: failed in baseline, runs now"}

    out.update(base_s=step_median_s(base), cur_s=step_median_s(cur))
    out["change"] = relative_change(out["cur_s"], out["base_s"])
    noises = [n for n in (relative_noise(cur), relative_noise(base)) if n is not None]
    out["noise"] = max(noises) if noises else None
    out["loss"], out["loss_kind"] = loss_change(cur, base)

    worse, better = [], []
    bar = max(max_slowdown, out["noise"] or 0.0)  # must beat both the threshold and the noise
    if out["change"] is not None and out["change"] > bar:
        worse.append("slower")
    if out["change"] is not None and -out["change"] > bar:
        better.append("faster")
    if out["loss"] is not None and out["loss"] > max_loss:
        worse.append(f"{out['loss_kind']} loss up")
    if out["loss"] is not None and -out["loss"] > max_loss:
        better.append(f"{out['loss_kind']} loss down")

    if worse:
        return {**out, "kind": REGRESSION, "verdict": "REGRESSION: " + ", ".join(worse + better)}
    if better:
        return {**out, "kind": IMPROVEMENT, "verdict": "IMPROVEMENT: " + ", ".join(better)}
    return {**out, "kind": SAME, "verdict": "same (within noise)"}


def compare(current: dict, baseline: dict, max_slowdown: float, max_loss: float) -> list[dict]:
    """Rows for every (scenario, variant) on either side: baseline order first, then new ones."""
    keys = list(baseline) + [k for k in current if k not in baseline]
    return [{"name": f"{k[0]}/{k[1]}", **judge(current.get(k), baseline.get(k), max_slowdown, max_loss)}
            for k in keys]


def machine_note(current: dict, baseline: dict) -> str | None:
    """A warning when the two sides ran on different machines: their timings don't compare."""
    cur = dict.fromkeys(m for r in current.values() if (m := machine(r.get("env"))))
    base = dict.fromkeys(m for r in baseline.values() if (m := machine(r.get("env"))))
    if set(cur) == set(base) or not cur or not base:
        return None
    return f"Note: different machines (current: {', '.join(cur)}; baseline: {', '.join(base)})."


def summary(rows: list[dict], max_slowdown: float, max_loss: float) -> str:
    n = {kind: sum(r["kind"] == kind for r in rows) for kind in (REGRESSION, IMPROVEMENT, SAME, NEW)}
    text = (f"{'FAIL' if n[REGRESSION] else 'PASS'}: {n[REGRESSION]} regression(s), "
            f"{n[IMPROVEMENT]} improvement(s), {n[SAME]} same, {n[NEW]} new "
            f"(max slowdown {max_slowdown * 100:g}% beyond noise, max loss increase {max_loss:g}).")
    if n[IMPROVEMENT]:
        text += " Improvements: refresh the stored baseline."
    return text


def _loss_cell(row: dict) -> str:
    return fmt.fixed(row["loss"], 4, signed=True) + (f" ({row['loss_kind']})" if row["loss_kind"] else "")


def render(rows: list[dict], note: str | None, line: str, current_path: str, baseline_path: str) -> str:
    headers = ["variant", "baseline ms", "current ms", "change", "noise", "loss change", "verdict"]
    cells = [[r["name"], fmt.ms(r["base_s"]), fmt.ms(r["cur_s"]), fmt.percent(r["change"], signed=True),
              fmt.percent(r["noise"]), _loss_cell(r), r["verdict"]] for r in rows]
    parts = [f"Current: {current_path} · Baseline: {baseline_path}"] + ([note] if note else [])
    parts += [fmt.table(headers, cells, "lrrrrrl"), line]
    return "\n\n".join(parts) + "\n"


def compare_command(args) -> int:
    max_slowdown = parse_percent(args.max_slowdown)
    if args.max_loss_increase < 0:
        raise UserError(f"--max-loss-increase {args.max_loss_increase:g} is negative.",
                        fix="give the allowed absolute loss increase, e.g. --max-loss-increase 0.02.")
    current, baseline = load_latest([args.current]), load_latest([args.baseline])
    rows = compare(current, baseline, max_slowdown, args.max_loss_increase)
    text = render(rows, machine_note(current, baseline), summary(rows, max_slowdown, args.max_loss_increase),
                  args.current, args.baseline)
    fmt.emit(text, None)
    if args.output:
        fmt.emit(text, args.output)
    return 1 if any(r["kind"] == REGRESSION for r in rows) else 0
