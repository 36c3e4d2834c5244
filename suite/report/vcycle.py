"""The V-cycle's phases (``[tricks.multilevel]``): what each level cost and what it left behind, from
the ``extra.multilevel.phases`` block the workload records (``suite.tricks.multilevel.vcycle``)."""
from __future__ import annotations

from suite.report import fmt
from suite.report.select import is_ok, metric


def phases_section(records: list[dict]) -> list[str]:
    body = []
    for rec in (r for r in records if is_ok(r)):
        for ph in metric(rec, "extra", "multilevel", "phases") or []:
            start, end = ph.get("validation_at_start"), ph.get("validation_at_end")
            body.append([rec["variant"], str(ph["phase"] + 1), f"{ph['layers']} × {ph['hidden']}",
                         fmt.count(ph["parameters"]), f"{ph['lr']:g}", str(ph["steps"]), fmt.count(ph["tokens"]),
                         fmt.count(ph["flops"]), fmt.fixed(ph["walltime_s"], 1),
                         fmt.ms(ph["walltime_s"] / ph["steps"]) if ph["steps"] else fmt.NA,
                         fmt.fixed(ph["transition_s"], 2) if ph["phase"] else "—",
                         fmt.fixed(start, 3), fmt.fixed(end, 3)])
    if not body:
        return []
    headers = ["variant", "phase", "level (layers × width)", "parameters", "peak LR", "steps", "tokens",
               "model FLOPs", "walltime (s)", "per step (ms)", "level change (s)", "val loss at start", "at end"]
    return ["### V-cycle phases",
            fmt.table(headers, body, "ll" + "r" * 11),
            "Walltime per phase: its step times plus the level change before it (gather, coalesce or "
            "de-coalesce and interpolate, build the next model and optimizer); validation excluded. "
            "Val loss at start: the new level right after the level change."]
