"""Cost at equal quality (MLPerf style): how much training each variant needed to reach one
validation loss, read from the validation curves the runner records.

The target is the one the scenario set (``workload.target_loss``, carried in the records' ``target``
block), else the baseline variant's final validation loss. A variant reaches it at the first
validation whose loss is at or below the target; its cost there is the curve point's steps, tokens,
model FLOPs and training walltime (step times summed, validation passes excluded).
"""
from __future__ import annotations

from suite.report import fmt
from suite.report.select import baseline_of, is_ok, metric, relative_change


def target_of(records: list[dict]) -> float | None:
    for rec in records:
        t = metric(rec, "target", "target_loss")
        if t is not None:
            return t
    return metric(baseline_of(records), "validation_loss")


def reach(rec: dict, target: float) -> dict | None:
    """The first curve point at or below target: {'step', 'tokens', 'flops', 'walltime_s', 'loss'}."""
    steps, tokens = metric(rec, "steps"), metric(rec, "tokens")
    for point in metric(rec, "validation_curve") or []:
        if len(point) >= 4 and point[1] <= target:
            step, loss, walltime, flops = point[:4]
            return {"step": step, "tokens": tokens * step // steps if steps else None, "flops": flops,
                    "walltime_s": walltime, "loss": loss}
    return None


def quality_rows(records: list[dict]) -> tuple[float | None, list[dict]]:
    ok = [r for r in records if is_ok(r)]
    target = target_of(records)
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
            "delta_flops_pct": None if not (hit and base_hit) else 100 * relative_change(hit["flops"], base_hit["flops"]),
            "delta_walltime_pct": None if not (hit and base_hit) else
            100 * relative_change(hit["walltime_s"], base_hit["walltime_s"]),
        })
    return target, rows


def quality_section(records: list[dict]) -> list[str]:
    target, rows = quality_rows(records)
    if not rows:
        return []
    body = []
    for r in rows:
        name = r["variant"] + (" (baseline)" if r["baseline"] else "")
        if not r["reached"]:
            body.append([name, "not reached"] + [""] * 6)
            continue
        dash = r["baseline"]
        body.append([name, str(r["step"]), fmt.count(r["tokens"]), fmt.count(r["flops"]),
                     fmt.fixed(r["walltime_s"], 1), fmt.fixed(r["loss"], 4),
                     "—" if dash else fmt.fixed(r["delta_flops_pct"], 1, signed=True, unit="%"),
                     "—" if dash else fmt.fixed(r["delta_walltime_pct"], 1, signed=True, unit="%")])
    headers = ["variant", "step", "tokens", "model FLOPs", "walltime (s)", "val loss", "Δ FLOPs", "Δ walltime"]
    return [f"### Cost to reach validation loss {target:.4f}",
            fmt.table(headers, body, "l" + "r" * 7),
            "First validation at or below the target; walltime sums training step times "
            "(validation excluded). A variant validated every N steps can overshoot by up to N steps."]
