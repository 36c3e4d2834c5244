"""What multi-level training adds to reports: the V-cycle's phases table, the validation curve over
every phase for the loss plot, and, for schema-1 records, per-phase step times in place of the
pooled step-time spread (a V-cycle's steps have a different shape in every phase).

Torch-free (found by the reporter through ``suite.registry.report_modules``).
"""
from __future__ import annotations

from suite.metrics.declare import measure
from suite.records import DICT, INT, LIST, NUM
from suite.report import fmt
from suite.report.plugins import ReportPlugin, register
from suite.report.select import is_ok, metric
from suite.workloads.measures import STEP_TIME

PHASE_KEYS = ("phase", "layers", "hidden", "parameters", "lr", "steps", "tokens", "flops", "walltime_s",
              "transition_s")
BLOCK = "metrics.extra.multilevel"
FIELDS = {BLOCK: DICT, f"{BLOCK}.phases": LIST, f"{BLOCK}.phases[]": DICT + "!",
          **{f"{BLOCK}.phases[].{k}": (INT if k in ("phase", "layers", "hidden", "steps") else NUM) + "!"
             for k in PHASE_KEYS},
          f"{BLOCK}.phases[].validation_at_start": NUM, f"{BLOCK}.phases[].validation_at_end": NUM,
          f"{BLOCK}.validation_curve": LIST, f"{BLOCK}.validation_curve[]": LIST + "!",
          f"{BLOCK}.validation_curve[][]": NUM}


def phases_section(records: list[dict], ctx: dict | None = None) -> list[str]:
    """One row per phase of every V-cycle record (``extra.multilevel.phases``, suite.tricks.multilevel.vcycle)."""
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


def curve(rec: dict) -> list | None:
    """[step, loss, walltime_s, flops, phase] of every phase: the record's own validation_curve keeps only
    the final phase (the full-size model the cost table compares)."""
    points = metric(rec, "extra", "multilevel", "validation_curve") or []
    return [p[:5] for p in points if len(p) >= 5] or None


def upgrade_v1(rec: dict) -> None:
    """Schema 1 kept no per-step times: each phase's mean step time (its walltime less the level change,
    over its steps, warm-up included) replaces the pooled step-time measure."""
    phases = metric(rec, "extra", "multilevel", "phases")
    if not phases:
        return
    rec["measures"] = [m for m in rec["measures"] if m["name"] != STEP_TIME.name]
    for ph in phases:
        if not ph["steps"]:
            continue
        mean = (ph["walltime_s"] - ph["transition_s"]) / ph["steps"]
        m = measure(STEP_TIME, mean, phase=ph["phase"], shape=f"{ph['layers']}x{ph['hidden']}")
        m["summary"] = {"mean": mean, "n": ph["steps"],
                        "note": "schema 1: mean over the phase's steps, warm-up included; no median or spread"}
        rec["measures"].append(m)


register(ReportPlugin("multilevel", upgrade_v1=upgrade_v1, fields=FIELDS, curve=curve,
                      sections=phases_section))
