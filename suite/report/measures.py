"""Measures taken at positions of a schedule (``measures`` with a ``point``, suite.metrics.declare):
the step time of a run whose step shape changes, per phase or per kept length, read generically from
the records. A pooled median and spread over such a run mixes shapes (its spread is the schedule, not
noise); this table shows each position on its own, with the spread of its own samples.

Only measures with raw samples are listed (records read from schema 1 kept none); grid points of
inference and accuracy workloads have their own tables.
"""
from __future__ import annotations

from suite.metrics.stats import percentile
from suite.report import fmt
from suite.report.select import is_ok

NOTE = ("Per schedule position: the median of that position's own samples ± half their p10–p90 spread "
        "(warm-up steps excluded); compare variants at equal positions, not through the pooled step time.")


def _value(x: float | None, unit: str) -> str:
    if x is None:
        return fmt.NA
    return fmt.ms(x) + " ms" if unit == "s" else f"{fmt.sig(x)} {unit}".rstrip()


def _point(point: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def pooled_over_positions(rec: dict) -> bool:
    """Whether the record measured its step time per schedule position (from samples): its pooled
    ``metrics.step_time_s`` then mixes step shapes."""
    return any(m.get("name") == "step_time" and m.get("point") and m.get("samples")
               for m in rec.get("measures") or [])


def positions_section(records: list[dict]) -> list[str]:
    body = []
    for rec in (r for r in records if is_ok(r)):
        for m in rec.get("measures") or []:
            samples = sorted(x for x in (m.get("samples") or []) if x is not None)
            if not m.get("point") or not samples or m.get("compare") != "median":
                continue  # a mean-compared measure's value is no median
            half = (percentile(samples, 90) - percentile(samples, 10)) / 2
            body.append([rec["variant"], m["name"], _point(m["point"]), _value(m.get("value"), m.get("unit", "")),
                         _value(half, m.get("unit", "")), str(len(samples))])
    if not body:
        return []
    return ["### Per schedule position",
            fmt.table(["variant", "measure", "position", "median", "± half p10–p90", "samples"], body, "lllrrr"),
            NOTE]
