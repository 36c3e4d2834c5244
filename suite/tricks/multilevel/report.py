"""What multi-level training adds to reports: the V-cycle's phases table, the validation curve over
every phase for the loss plot, and, for schema-1 records, per-phase step times in place of the
pooled step-time spread (a V-cycle's steps have a different shape in every phase).

Torch-free (found by the reporter through ``suite.registry.report_modules``).
"""
from __future__ import annotations

from suite.metrics.declare import measure
from suite.report import fmt, phases
from suite.report.plugins import ReportPlugin, register
from suite.report.select import metric
from suite.workloads.measures import STEP_TIME

FIELDS = phases.fields("multilevel")


def phases_section(records: list[dict], ctx: dict | None = None) -> list[str]:
    """One row per phase of every V-cycle record (``extra.multilevel.phases``, suite.tricks.multilevel.vcycle)."""
    body = phases.rows(records, "multilevel", lambda rec, ph: str(ph["phase"] + 1))
    if not body:
        return []
    headers = ["variant", "phase", "level (layers × width)", "parameters", "peak LR", "steps", "tokens",
               "model FLOPs", "walltime (s)", "per step (ms)", "level change (s)", "val loss at start", "at end"]
    return ["### V-cycle phases",
            fmt.table(headers, body, "ll" + "r" * 11),
            "Walltime per phase: its step times plus the level change before it (gather, coalesce or "
            "de-coalesce and interpolate, build the next model and optimizer); validation excluded. "
            "Val loss at start: the new level right after the level change."]


def upgrade_v1(rec: dict) -> None:
    """Schema 1 kept no per-step times: each phase's mean step time (its walltime less the level change,
    over its steps, warm-up included) replaces the pooled step-time measure."""
    recorded = metric(rec, "extra", "multilevel", "phases")
    if not recorded:
        return
    rec["measures"] = [m for m in rec["measures"] if m["name"] != STEP_TIME.name]
    for ph in recorded:
        if not ph["steps"]:
            continue
        mean = (ph["walltime_s"] - ph["transition_s"]) / ph["steps"]
        m = measure(STEP_TIME, mean, phase=ph["phase"], shape=f"{ph['layers']}x{ph['hidden']}")
        m["summary"] = {"mean": mean, "n": ph["steps"],
                        "note": "schema 1: mean over the phase's steps, warm-up included; no median or spread"}
        rec["measures"].append(m)


register(ReportPlugin("multilevel", upgrade_v1=upgrade_v1, fields=FIELDS, curve=phases.curve("multilevel"),
                      sections=phases_section))
