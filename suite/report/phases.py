"""Runs trained in phases of different model shapes: a technique's ``metrics.extra.<name>`` block holds
``phases`` (one dict a phase: shape, LR, steps, tokens, FLOPs, walltime, the change before it, the
validation loss at its start and end) and a ``validation_curve`` over every phase. Plug-ins that write
such a block build their report section from these helpers; torch-free."""
from __future__ import annotations

from suite.records import DICT, INT, LIST, NUM
from suite.report import fmt
from suite.report.select import is_ok, metric

PHASE_KEYS = ("phase", "layers", "hidden", "parameters", "lr", "steps", "tokens", "flops", "walltime_s",
              "transition_s")


def fields(name: str) -> dict:
    """The record fields a phased block ``metrics.extra.<name>`` is checked against on read."""
    block = f"metrics.extra.{name}"
    return {block: DICT, f"{block}.phases": LIST, f"{block}.phases[]": DICT + "!",
            **{f"{block}.phases[].{k}": (INT if k in ("phase", "layers", "hidden", "steps") else NUM) + "!"
               for k in PHASE_KEYS},
            f"{block}.phases[].validation_at_start": NUM, f"{block}.phases[].validation_at_end": NUM,
            f"{block}.validation_curve": LIST, f"{block}.validation_curve[]": LIST + "!",
            f"{block}.validation_curve[][]": NUM}


def rows(records: list[dict], name: str, label) -> list[list[str]]:
    """One table row per phase of every ok record; ``label(record, phase)`` names the phase."""
    body = []
    for rec in (r for r in records if is_ok(r)):
        for ph in metric(rec, "extra", name, "phases") or []:
            body.append([rec["variant"], label(rec, ph), f"{ph['layers']} × {ph['hidden']}",
                         fmt.count(ph["parameters"]), f"{ph['lr']:g}", str(ph["steps"]), fmt.count(ph["tokens"]),
                         fmt.count(ph["flops"]), fmt.fixed(ph["walltime_s"], 1),
                         fmt.ms(ph["walltime_s"] / ph["steps"]) if ph["steps"] else fmt.NA,
                         fmt.fixed(ph["transition_s"], 2) if ph["phase"] else "—",
                         fmt.fixed(ph.get("validation_at_start"), 3), fmt.fixed(ph.get("validation_at_end"), 3)])
    return body


def curve(name: str):
    """The plot's curve of a phased run: [step, loss, walltime_s, flops, phase] over every phase (the
    record's own validation_curve keeps only the final phase)."""
    def points(rec: dict) -> list | None:
        found = metric(rec, "extra", name, "validation_curve") or []
        return [p[:5] for p in found if len(p) >= 5] or None
    return points
