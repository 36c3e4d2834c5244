"""What depth stacking adds to reports: its two phases in a table (shallow, then grown, with the validation
loss at the end of the shallow phase and right after the growth, where the jump shows that stacking does
not preserve the function), and the validation curve over both phases for the loss plot.

Torch-free (found by the reporter through ``suite.registry.report_modules``).
"""
from __future__ import annotations

from suite.records import INT
from suite.report import fmt, phases
from suite.report.plugins import ReportPlugin, register
from suite.report.select import metric

FIELDS = {**phases.fields("stacking"), "metrics.extra.stacking.growth": INT}


def phases_section(records: list[dict], ctx: dict | None = None) -> list[str]:
    """One row per phase of every stacking record (``extra.stacking.phases``, suite.tricks.stacking.workload)."""
    def label(rec, ph):
        return "shallow" if ph["phase"] == 0 else f"grown ×{metric(rec, 'extra', 'stacking', 'growth')}"
    body = phases.rows(records, "stacking", label)
    if not body:
        return []
    headers = ["variant", "phase", "layers × width", "parameters", "peak LR", "steps", "tokens", "model FLOPs",
               "walltime (s)", "per step (ms)", "growth (s)", "val loss at start", "at end"]
    return ["### Depth stacking phases",
            fmt.table(headers, body, "ll" + "r" * 11),
            "Walltime per phase: its step times plus, for the grown phase, the growth (gather, stack, build the "
            "grown model and optimizer); validation excluded. The grown phase's val loss at start is measured "
            "right after the growth: stacking copies parameters but does not preserve the shallow model's loss."]


register(ReportPlugin("stacking", fields=FIELDS, curve=phases.curve("stacking"), sections=phases_section))
