"""What depth stacking adds to reports: its two phases in a table (shallow, then grown, with the validation
loss at the end of the shallow phase and right after the growth, where the jump shows that stacking does
not preserve the function), and the validation curve over both phases for the loss plot.

Torch-free (found by the reporter through ``suite.registry.report_modules``).
"""
from __future__ import annotations

from suite.records import DICT, INT, LIST, NUM
from suite.report import fmt
from suite.report.plugins import ReportPlugin, register
from suite.report.select import is_ok, metric

BLOCK = "metrics.extra.stacking"
PHASE_KEYS = ("phase", "layers", "hidden", "parameters", "lr", "steps", "tokens", "flops", "walltime_s",
              "transition_s")
FIELDS = {BLOCK: DICT, f"{BLOCK}.growth": INT, f"{BLOCK}.phases": LIST, f"{BLOCK}.phases[]": DICT + "!",
          **{f"{BLOCK}.phases[].{k}": (INT if k in ("phase", "layers", "hidden", "steps") else NUM) + "!"
             for k in PHASE_KEYS},
          f"{BLOCK}.phases[].validation_at_start": NUM, f"{BLOCK}.phases[].validation_at_end": NUM,
          f"{BLOCK}.validation_curve": LIST, f"{BLOCK}.validation_curve[]": LIST + "!",
          f"{BLOCK}.validation_curve[][]": NUM}


def phases_section(records: list[dict], ctx: dict | None = None) -> list[str]:
    """One row per phase of every stacking record (``extra.stacking.phases``, suite.tricks.stacking.workload)."""
    body = []
    for rec in (r for r in records if is_ok(r)):
        for ph in metric(rec, "extra", "stacking", "phases") or []:
            growth = metric(rec, "extra", "stacking", "growth")
            body.append([rec["variant"], "shallow" if ph["phase"] == 0 else f"grown ×{growth}",
                         f"{ph['layers']} × {ph['hidden']}", fmt.count(ph["parameters"]), f"{ph['lr']:g}",
                         str(ph["steps"]), fmt.count(ph["tokens"]), fmt.count(ph["flops"]),
                         fmt.fixed(ph["walltime_s"], 1),
                         fmt.ms(ph["walltime_s"] / ph["steps"]) if ph["steps"] else fmt.NA,
                         fmt.fixed(ph["transition_s"], 2) if ph["phase"] else "—",
                         fmt.fixed(ph.get("validation_at_start"), 3), fmt.fixed(ph.get("validation_at_end"), 3)])
    if not body:
        return []
    headers = ["variant", "phase", "layers × width", "parameters", "peak LR", "steps", "tokens", "model FLOPs",
               "walltime (s)", "per step (ms)", "growth (s)", "val loss at start", "at end"]
    return ["### Depth stacking phases",
            fmt.table(headers, body, "ll" + "r" * 11),
            "Walltime per phase: its step times plus, for the grown phase, the growth (gather, stack, build the "
            "grown model and optimizer); validation excluded. The grown phase's val loss at start is measured "
            "right after the growth: stacking copies parameters but does not preserve the shallow model's loss."]


def curve(rec: dict) -> list | None:
    """[step, loss, walltime_s, flops, phase] of both phases (the record's own curve keeps the grown phase)."""
    points = metric(rec, "extra", "stacking", "validation_curve") or []
    return [p[:5] for p in points if len(p) >= 5] or None


register(ReportPlugin("stacking", fields=FIELDS, curve=curve, sections=phases_section))
