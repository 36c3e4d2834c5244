"""The statistics of the regression gate: one decision per measurement, on the uncertainty of its
statistic, never on the spread of single samples.

Why. A gate that compares a change with the spread of individual step times lets a regression that
also adds jitter raise its own bar, and a variable-shape run (its steps differ by schedule, not by
noise) can never fail. What decides here is how well each side's *statistic* is known, and a
change counts only when it is both real (its interval excludes "no change") and large enough to
matter (it exceeds a minimum effect). The gate is two-sided: an unexplained improvement is listed
too, so the stored baseline gets refreshed (as PyTorch's benchmark gates do).

Each record's ``measures`` declare how they compare (``compare``):

* ``median`` (times): the ratio current / baseline of the medians. With raw samples on both sides, a
  percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13): ``RESAMPLES`` resamples of each
  side with replacement, independently, the median ratio of each, the central ``LEVEL`` of them.
  Seeded per measurement, so the same records always give the same verdict. Without samples (schema-1
  records keep only median, p10, p90 and n) a normal interval of the log ratio, with the standard
  error of each median estimated as ``(p90 - p10) / (1.6 sqrt(n))``: the asymptotic
  ``1 / (2 f sqrt(n))`` with the density at the median ``f`` taken as the mean density of the
  central 80% (``0.8 / (p90 - p10)``); for a normal distribution this is 1.28x the exact value,
  so the approximation errs towards "within noise".
  REGRESSION when the interval lies wholly on the worse side of 1 and the point ratio is worse by
  more than ``max_slowdown``.
* ``mean`` (losses, perplexity, accuracy): the difference of the means with its standard error,
  paired (the SE of the per-item differences) when both sides scored the same windows or examples
  in the same order, else Welch's unpaired SE. Normal interval at ``LEVEL``. The minimum effect is
  ``max_loss_increase`` for lower-is-better means and ``max_acc_drop`` for higher-is-better ones,
  both absolute in the measure's unit. The minimum detectable effect at ``POWER`` power,
  ``(z_(1-a/2) + z_power) SE``, is reported, and a row says when it exceeds the minimum effect:
  that sample is too small to see the change asked for.
* ``tolerance`` (memory, energy): a fixed relative tolerance (the measure's ``tolerance``, Megatron-LM's
  functional tests use 5%), no interval. When the baseline holds repeats of the configuration, the
  tolerance applies beyond the range of their values (``value_ranges``) rather than around the latest:
  peak allocated memory of one configuration moved by up to 15% between runs on the nightly's small
  variants (collector and allocator timing), a spread a t-based floor from three runs widened to
  66–153%, while a value beyond everything seen is a change.
* ``info``, and every ``rate`` measure (throughput follows from time: gating it would count one
  change twice), are not gated.

Without samples or a spread, a ``median`` or ``mean`` measure falls back to the minimum effect alone
(like Megatron-LM's golden values) and its row says so.

Run-to-run noise. The intervals above know each run's own sampling noise, not how much two identical
runs differ: a host-bound step, an eager decode or a training run that amplifies non-deterministic
kernels moves between processes by more than its within-run uncertainty (measured in
reports/README.md: the nightly's run-to-run numbers). When the baseline holds several runs of a variant
with one configuration (records appended to one file), each measure gets a noise floor: with ``s``
the standard deviation of the k runs' statistic (log scale for ratios), the 95% prediction bound
of the difference of two single runs, ``t(0.975, k - 1) sqrt(2) s`` (Student's t: s rests on k - 1
degrees of freedom, so two runs give a loose floor, t = 12.7, three a usable one, t = 4.3). The
measure's minimum effect becomes the larger of the limit and this floor, so a change smaller than
the spread of identical runs is noise (PyTorch's benchmark gates keep a noise margin per benchmark
for the same reason).
"""
from __future__ import annotations

import json
import math
import random
import zlib
from dataclasses import dataclass
from statistics import NormalDist

from suite.metrics.stats import percentile

LEVEL = 0.95          # two-sided confidence level of every interval
RESAMPLES = 2000      # bootstrap resamples per measurement
SEED = 0              # bootstrap seed, mixed with the measurement's name and point
POWER = 0.80          # power of the minimum detectable effect
Z = NormalDist().inv_cdf(0.5 + LEVEL / 2)
Z_POWER = NormalDist().inv_cdf(POWER)
MEDIAN_SE_FACTOR = 1.6  # SE(median) ~ (p90 - p10) / (1.6 sqrt(n)), see the module docstring
DEFAULT_TOLERANCE = 0.05
# Student's t, two-sided 95%, by degrees of freedom (a df between rows takes the smaller row's value)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}

REGRESSION, IMPROVEMENT, SAME, NEW, NOT_GATED = "regression", "improvement", "same", "new", "not gated"
GATED = ("median", "mean", "tolerance")


@dataclass(frozen=True)
class Limits:
    """Minimum effects: a change smaller than these is never a regression, however certain."""
    max_slowdown: float = 0.05       # relative, median-compared measures
    max_loss_increase: float = 0.01  # absolute, lower-is-better means (nats: 0.01 = perplexity x1.01)
    max_acc_drop: float = 0.02       # absolute, higher-is-better means (fraction: 2 points)
    tolerance: float | None = None   # overrides every tolerance measure's own tolerance


def key_of(measure: dict) -> tuple[str, str]:
    """(name, point) as a hashable key: measures pair by both, never pooled over points."""
    return measure.get("name", "?"), json.dumps(measure.get("point") or {}, sort_keys=True)


def point_text(measure: dict) -> str:
    point = measure.get("point") or {}
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "-"


def is_gated(measure: dict) -> bool:
    return measure.get("compare") in GATED and measure.get("kind") != "rate"


def finite(values) -> list[float]:
    """The finite numbers of a sample list (non-finite samples are stored as null)."""
    out = []
    for v in values or ():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def spread_summary(measure: dict) -> dict | None:
    """median, p10, p90, n of one side: from its samples, else from a stored summary (the measure's
    ``summary`` dict, or the keys on the measure itself). None when neither is there."""
    samples = finite(measure.get("samples"))
    if len(samples) >= 2:
        s = sorted(samples)
        return {"median": percentile(s, 50), "p10": percentile(s, 10), "p90": percentile(s, 90), "n": len(s)}
    src = measure.get("summary") if isinstance(measure.get("summary"), dict) else measure
    median = _number(src.get("median", measure.get("value")))
    p10, p90, n = _number(src.get("p10")), _number(src.get("p90")), _number(src.get("n"))
    if None in (median, p10, p90, n) or n < 2 or p90 < p10:
        return None
    return {"median": median, "p10": p10, "p90": p90, "n": int(n)}


def _seed(key: tuple[str, str]) -> int:
    return zlib.crc32(f"{SEED}|{key[0]}|{key[1]}".encode())


def _median(values: list[float]) -> float:
    return percentile(sorted(values), 50)


def bootstrap_median_ratio(cur: list[float], base: list[float], seed: int) -> tuple[float, float, float]:
    """(point, low, high): median(cur) / median(base) and its percentile bootstrap interval."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(RESAMPLES):
        b = _median(rng.choices(base, k=len(base)))
        c = _median(rng.choices(cur, k=len(cur)))
        if b > 0:
            ratios.append(c / b)
    ratios.sort()
    tail = (1 - LEVEL) / 2 * 100
    return _median(cur) / _median(base), percentile(ratios, tail), percentile(ratios, 100 - tail)


def summary_median_ratio(cur: dict, base: dict) -> tuple[float, float, float]:
    """(point, low, high) of the median ratio from median, p10, p90 and n of each side."""
    def rel_se(s):
        return (s["p90"] - s["p10"]) / (MEDIAN_SE_FACTOR * math.sqrt(s["n"])) / s["median"]
    ratio = cur["median"] / base["median"]
    se = math.hypot(rel_se(cur), rel_se(base))
    return ratio, ratio * math.exp(-Z * se), ratio * math.exp(Z * se)


def t975(df: float) -> float:
    """Student's t for a two-sided 95% interval (``T975``'s row at or below ``df``; normal past 60)."""
    return T975[max(d for d in T975 if d <= max(df, 1))] if df <= 60 else Z


def ratio_of_means_interval(new: list[float], old: list[float]) -> tuple[float, float] | None:
    """95% interval of mean(new) / mean(old) from independent repeats (e.g. seeds): the delta method on
    the log ratio, SE² = s_new² / (n_new mean_new²) + s_old² / (n_old mean_old²), with Welch-Satterthwaite
    degrees of freedom. None with fewer than two repeats a side or a non-positive mean."""
    if len(new) < 2 or len(old) < 2:
        return None
    (mn, vn), (mo, vo) = _mean_var(new), _mean_var(old)
    if mn <= 0 or mo <= 0:
        return None
    an, ao = vn / (len(new) * mn ** 2), vo / (len(old) * mo ** 2)
    if an + ao == 0:
        return mn / mo, mn / mo
    df = (an + ao) ** 2 / (an ** 2 / (len(new) - 1) + ao ** 2 / (len(old) - 1))
    half = t975(df) * math.sqrt(an + ao)
    return mn / mo * math.exp(-half), mn / mo * math.exp(half)


def _mean_var(x: list[float]) -> tuple[float, float]:
    m = sum(x) / len(x)
    return m, sum((v - m) ** 2 for v in x) / (len(x) - 1)


def mean_difference(cur_m: dict, base_m: dict) -> dict | None:
    """{"diff", "se", "paired", "n"} of current minus baseline mean, or None without samples."""
    cur, base = finite(cur_m.get("samples")), finite(base_m.get("samples"))
    if len(cur) < 2 or len(base) < 2:
        se_c, se_b = _stored_se(cur_m), _stored_se(base_m)  # schema 1 kept a standard error and n
        if se_c is None or se_b is None:
            return None
        return {"diff": float(cur_m["value"]) - float(base_m["value"]), "se": math.hypot(se_c, se_b),
                "paired": False, "n": f"stored SE, n={_stored_n(cur_m)} vs {_stored_n(base_m)}"}
    raw_c, raw_b = cur_m.get("samples") or [], base_m.get("samples") or []
    if (cur_m.get("paired") and base_m.get("paired") and len(raw_c) == len(raw_b)
            and len(cur) == len(raw_c) and len(base) == len(raw_b)):
        d = [c - b for c, b in zip(cur, base)]
        mean, var = _mean_var(d)
        return {"diff": mean, "se": math.sqrt(var / len(d)), "paired": True, "n": f"{len(d)} pairs"}
    (mc, vc), (mb, vb) = _mean_var(cur), _mean_var(base)
    return {"diff": mc - mb, "se": math.sqrt(vc / len(cur) + vb / len(base)), "paired": False,
            "n": f"{len(cur)} vs {len(base)}"}


def _stored_se(measure: dict) -> float | None:
    summary = measure.get("summary") if isinstance(measure.get("summary"), dict) else {}
    se = _number(summary.get("stderr"))
    return se if se is not None and se >= 0 else None


def _stored_n(measure: dict):
    summary = measure.get("summary") if isinstance(measure.get("summary"), dict) else {}
    return summary.get("n", "?")


def _verdict(worse: bool, better: bool, what: str) -> tuple[str, str]:
    if worse:
        return REGRESSION, f"REGRESSION: {what}"
    if better:
        return IMPROVEMENT, f"IMPROVEMENT: {what}"
    return SAME, "same"


def _worse_word(measure: dict) -> tuple[str, str]:
    if measure.get("kind") == "time":
        return "slower", "faster"
    if measure.get("kind") == "memory":
        return "more memory", "less memory"
    return "worse", "better"


# Runs a noise floor needs: from two, t(0.975, 1) = 12.7 makes the floor about 9 times the runs' difference
# (two nights 5% apart would pass +85%), so a 2-run baseline gates on the minimum effects alone.
MIN_RUNS_FOR_FLOOR = 3


def noise_floors(runs: list[list[dict]]) -> dict[tuple[str, str], tuple[float, int]]:
    """{(name, point): (floor, runs)} from repeated baseline runs of one configuration (each a list of
    measures): t(0.975, k - 1) sqrt(2) s, with s the sample SD of the k runs' values; relative (ratio - 1) for
    median measures, absolute for means (tolerance measures: ``value_ranges``). Only keys with
    ``MIN_RUNS_FOR_FLOOR`` or more finite values."""
    out = {}
    for key, (how, vs) in _run_values(runs, ("median", "mean"), MIN_RUNS_FOR_FLOOR).items():
        relative = how != "mean"
        xs = [math.log(v) for v in vs] if relative else vs
        half = t975(len(vs) - 1) * math.sqrt(2) * math.sqrt(_mean_var(xs)[1])
        out[key] = (math.exp(half) - 1 if relative else half, len(vs))
    return out


def value_ranges(runs: list[list[dict]]) -> dict[tuple[str, str], tuple[float, float, int]]:
    """{(name, point): (lowest, highest, runs)} of the tolerance measures of repeated baseline runs of one
    configuration (each a list of measures), for keys with two or more finite values."""
    return {key: (min(vs), max(vs), len(vs)) for key, (_, vs) in _run_values(runs, ("tolerance",), 2).items()}


def _run_values(runs: list[list[dict]], compares: tuple[str, ...],
                least: int) -> dict[tuple[str, str], tuple[str, list[float]]]:
    """{(name, point): (compare, the runs' finite values)} of the gated measures compared one of ``compares``
    ways, for keys with ``least`` or more values."""
    values: dict[tuple[str, str], tuple[str, list[float]]] = {}
    for measures in runs:
        for m in measures:
            v = _number(m.get("value"))
            # a median compares by its ratio, which needs a positive value
            if m.get("compare") in compares and is_gated(m) and v is not None and (v > 0 or m["compare"] != "median"):
                values.setdefault(key_of(m), (m["compare"], []))[1].append(v)
    return {key: found for key, found in values.items() if len(found[1]) >= least}


def judge_measure(cur: dict | None, base: dict | None, limits: Limits,
                  floor: tuple[float, int] | None = None,
                  value_range: tuple[float, float, int] | None = None) -> dict:
    """One row of the gate for a (name, point) pair of measures; ``floor``: the run-to-run noise floor
    (value, number of baseline runs) from ``noise_floors``, ``value_range``: a tolerance measure's range
    over the baseline's runs from ``value_ranges``, when the baseline has repeats."""
    m = cur or base
    row = {"name": m.get("name", "?"), "point": point_text(m), "unit": m.get("unit", ""),
           "compare": m.get("compare"), "base": base and base.get("value"), "cur": cur and cur.get("value"),
           "change": None, "low": None, "high": None, "relative": True, "method": "", "note": "",
           "floor": floor, "range": value_range}
    if base is None:
        return {**row, "kind": NEW, "verdict": "new (no baseline)"}
    if cur is None:
        return {**row, "kind": REGRESSION, "verdict": "REGRESSION: missing in current"}
    if row["cur"] is None:
        reason = cur.get("reason") or "no value"
        kind = SAME if row["base"] is None else REGRESSION
        return {**row, "kind": kind, "verdict": f"{'REGRESSION: ' if kind == REGRESSION else ''}{reason}"}
    if row["base"] is None:
        return {**row, "kind": IMPROVEMENT, "verdict": f"IMPROVEMENT: baseline had {base.get('reason') or 'no value'}"}
    how = m.get("compare")
    if how == "mean":
        return _judge_mean(cur, base, row, limits)
    return _judge_relative(cur, base, row, limits)


def _judge_relative(cur: dict, base: dict, row: dict, limits: Limits) -> dict:
    """median (bootstrap or summary interval of the ratio) and tolerance (fixed relative bound)."""
    worse_word, better_word = _worse_word(cur)
    higher = cur.get("direction") == "higher"
    c, b = float(row["cur"]), float(row["base"])
    if b == 0:
        return {**row, "kind": SAME, "verdict": "same", "method": "baseline is 0: not compared"}
    ratio = c / b
    if cur.get("compare") == "tolerance":
        tol = limits.tolerance if limits.tolerance is not None else _number(cur.get("tolerance"))
        tol = DEFAULT_TOLERANCE if tol is None else tol
        row.update(change=ratio - 1, method=f"tolerance ±{tol * 100:g}%")
        lo = hi = b
        if row["range"]:  # repeats: beyond every value seen, not around the latest alone
            lo, hi = min(b, row["range"][0]), max(b, row["range"][1])
            row["method"] += (f" beyond {(lo / b - 1) * 100:+.1f}%…{(hi / b - 1) * 100:+.1f}%, the range of "
                              f"{row['range'][2]} baseline runs")
        above, below = c > hi * (1 + tol), c < lo * (1 - tol)
        worse, better = (below, above) if higher else (above, below)
        kind, verdict = _verdict(worse, better, worse_word if worse else better_word)
        return {**row, "kind": kind, "verdict": verdict}

    cur_samples, base_samples = finite(cur.get("samples")), finite(base.get("samples"))
    low = high = None
    if len(cur_samples) >= 3 and len(base_samples) >= 3:
        ratio, low, high = bootstrap_median_ratio(cur_samples, base_samples, _seed(key_of(cur)))
        method = f"bootstrap median ratio, n={len(cur_samples)} vs {len(base_samples)}"
    elif (sc := spread_summary(cur)) and (sb := spread_summary(base)):
        ratio, low, high = summary_median_ratio(sc, sb)
        method = f"median SE from p10-p90, n={sc['n']} vs {sb['n']}"
    else:
        method = "threshold only (no samples or spread)"
    row.update(change=ratio - 1, low=None if low is None else low - 1, high=None if high is None else high - 1,
               method=method)
    effect = _raised(row, limits.max_slowdown, relative=True)
    bar_up, bar_down = 1 + effect, 1 / (1 + effect)
    sure_up = low is None or low > 1
    sure_down = high is None or high < 1
    if higher:
        worse, better = ratio < bar_down and sure_down, ratio > bar_up and sure_up
    else:
        worse, better = ratio > bar_up and sure_up, ratio < bar_down and sure_down
    kind, verdict = _verdict(worse, better, worse_word if worse else better_word)
    if kind == SAME:
        beyond = ratio > bar_up or ratio < bar_down
        verdict = "same (within noise)" if beyond else "same"
    return {**row, "kind": kind, "verdict": verdict}


def _judge_mean(cur: dict, base: dict, row: dict, limits: Limits) -> dict:
    higher = cur.get("direction") == "higher"
    limit = limits.max_acc_drop if higher else limits.max_loss_increase
    diff = float(row["cur"]) - float(row["base"])
    row["relative"] = False
    est = mean_difference(cur, base)
    if est is None:
        row.update(change=diff, method="threshold only (no samples)")
        sure_worse = sure_better = True
    else:
        diff, se = est["diff"], est["se"]
        mde = (Z + Z_POWER) * se
        row.update(change=diff, low=diff - Z * se, high=diff + Z * se,
                   method=f"{'paired' if est['paired'] else 'unpaired'} mean difference ± SE, n={est['n']}, "
                          f"detectable {fmt_num(mde)}",
                   mde=mde)
    min_effect = _raised(row, limit, relative=False)
    if est is not None:
        if mde > min_effect:
            row["note"] = (f"sample too small to detect a change of {fmt_num(min_effect)} "
                           f"(detectable: {fmt_num(mde)})")
        sure_worse = (row["high"] < 0) if higher else (row["low"] > 0)
        sure_better = (row["low"] > 0) if higher else (row["high"] < 0)
    bad = -diff if higher else diff  # > 0: worse
    worse, better = bad > min_effect and sure_worse, -bad > min_effect and sure_better
    kind, verdict = _verdict(worse, better, "worse" if worse else "better")
    if kind == SAME:
        verdict = "same (within noise)" if abs(bad) > min_effect else "same"
    return {**row, "kind": kind, "verdict": verdict}


def _raised(row: dict, limit: float, relative: bool) -> float:
    """The minimum effect raised to the run-to-run noise floor, noted in the row's method."""
    if not row["floor"] or row["floor"][0] <= limit:
        return limit
    floor, runs = row["floor"]
    row["method"] += (f"; noise floor {floor * 100:.1f}%" if relative else f"; noise floor {fmt_num(floor)}") \
        + f" from {runs} baseline runs"
    return floor


def fmt_num(x: float) -> str:
    return f"{x:.3g}"


def judge_measures(cur_measures: list[dict], base_measures: list[dict], limits: Limits,
                   floors: dict | None = None, ranges: dict | None = None) -> list[dict]:
    """Rows for every gated (name, point) on either side, baseline order first, then new ones; ``floors``
    and ``ranges``: from the baseline's repeats (``noise_floors``, ``value_ranges``)."""
    cur = {key_of(m): m for m in cur_measures if is_gated(m)}
    base = {key_of(m): m for m in base_measures if is_gated(m)}
    keys = list(base) + [k for k in cur if k not in base]
    return [judge_measure(cur.get(k), base.get(k), limits, (floors or {}).get(k), (ranges or {}).get(k))
            for k in keys]
