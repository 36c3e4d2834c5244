"""Order statistics of repeated timings (no numpy needed)."""
from __future__ import annotations


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100], of an ascending list."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict | None:
    if not values:
        return None
    s = sorted(values)
    return {"median": percentile(s, 50), "p10": percentile(s, 10), "p90": percentile(s, 90),
            "p99": percentile(s, 99), "min": s[0], "max": s[-1], "mean": sum(s) / len(s), "n": len(s)}
