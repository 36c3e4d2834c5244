"""Metric declarations: what a measurement is, so that readers need not know who made it.

A workload or plug-in declares each metric it produces once, next to the code that measures it::

    STEP_TIME = declare(Metric("step_time", "s", "time", "lower", "median", doc="one optimizer step"))

and writes ``measure(STEP_TIME, median, samples=times)`` (plus ``**point`` for a position in a grid or a
schedule: ``batch=1, prompt=2048``, ``phase=2``) into the record's ``measures`` list. Each measure is
self-describing: ``suite report`` and ``suite compare`` read name, unit, kind, direction and the way to
compare it from the record, so neither hard-codes a list of fields or a technique's name.

    kind        time | rate | quality | memory | energy | count
    direction   lower | higher: which way is better
    compare     median     the gate compares medians of the raw samples (bootstrap interval of their ratio)
                mean       mean with its standard error; ``paired``: both runs score the same windows or
                           examples in the same order, so per-sample differences can be paired
                tolerance  a fixed relative tolerance (``tolerance``), for values without a sampling spread
                info       shown, never gated (rates that follow from a time, configuration-like counts)

Non-finite numbers never reach a record: a non-finite value becomes ``null`` with a ``reason``, and a
non-finite sample becomes ``null`` (the record stays strict JSON, and nothing is silently dropped).
This module is torch-free: the reporter imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("time", "rate", "quality", "memory", "energy", "count")
DIRECTIONS = ("lower", "higher")
COMPARES = ("median", "mean", "tolerance", "info")


@dataclass(frozen=True)
class Metric:
    """One declared metric. ``paired`` belongs to ``compare = "mean"`` metrics whose samples are scored
    on the same windows or examples in the same order by every run of the same configuration."""

    name: str
    unit: str
    kind: str
    direction: str
    compare: str
    tolerance: float | None = None
    doc: str = ""
    paired: bool = False

    def __post_init__(self):
        # declarations are code: a wrong one is a bug, so these are plain ValueErrors
        for field, value, choices in (("kind", self.kind, KINDS), ("direction", self.direction, DIRECTIONS),
                                      ("compare", self.compare, COMPARES)):
            if value not in choices:
                raise ValueError(f"metric {self.name!r}: {field} {value!r} is not one of {', '.join(choices)}")
        if (self.compare == "tolerance") != (self.tolerance is not None):
            raise ValueError(f"metric {self.name!r}: a tolerance is given exactly when compare is 'tolerance'")
        if self.tolerance is not None and not (0 < self.tolerance < math.inf):
            raise ValueError(f"metric {self.name!r}: tolerance must be a positive fraction")
        if self.paired and self.compare != "mean":
            raise ValueError(f"metric {self.name!r}: only compare='mean' metrics can be paired")


DECLARED: dict[str, Metric] = {}


def declare(metric: Metric) -> Metric:
    """Registers ``metric`` under its name; two different declarations of one name are a bug (the gate
    pairs measures by name and point, so one name must mean one thing everywhere)."""
    known = DECLARED.setdefault(metric.name, metric)
    if known != metric:
        raise ValueError(f"metric {metric.name!r} is declared twice, differently: {known} and {metric}")
    return metric


def finite(x) -> float | None:
    """``x`` as a float when it is a finite number, else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def nonfinite_reason(x) -> str | None:
    """'non-finite: nan' / 'non-finite: inf' / 'non-finite: -inf' for such floats, else None."""
    if isinstance(x, float) and not math.isfinite(x):
        return f"non-finite: {x}"
    return None


def measure(metric: Metric, value, samples=None, **point) -> dict:
    """One record measure of ``metric`` at ``point`` (a dict of str/int/bool values naming where in a grid
    or schedule it was taken; empty for a whole-run value). ``value`` is the statistic the metric compares
    (median or mean of ``samples`` for those kinds); ``samples`` the raw observations it came from."""
    m = {"name": metric.name, "unit": metric.unit, "kind": metric.kind, "direction": metric.direction,
         "compare": metric.compare, "point": {k: v for k, v in point.items()}}
    if metric.tolerance is not None:
        m["tolerance"] = metric.tolerance
    if metric.paired:
        m["paired"] = True
    reason = nonfinite_reason(value)
    m["value"] = None if reason else (int(value) if isinstance(value, int) and not isinstance(value, bool)
                                      else finite(value))
    if reason:
        m["reason"] = reason
    elif value is not None and m["value"] is None:
        raise ValueError(f"metric {metric.name!r}: value {value!r} is not a number")
    if samples is not None:
        m["samples"] = [finite(float(s)) for s in samples]
        dropped = sum(s is None for s in m["samples"])
        if dropped and "reason" not in m:
            m["reason"] = f"non-finite: {dropped} of {len(m['samples'])} samples"
    return m


def median(values) -> float | None:
    """Median of the finite values, None without any (the value of a compare='median' measure)."""
    s = sorted(v for v in (finite(x) for x in values) if v is not None)
    if not s:
        return None
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2

