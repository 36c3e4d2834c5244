"""What random-LTD adds to reading records: its ``extra.random_ltd`` fields, and for schema-1 records
the step-time measure marked as pooled (information, never gated). Random-LTD's step shape changes
with the kept length, so the spread of all its steps is the schedule, not noise; schema-2 records
carry one step-time measure per kept length instead (``RandomLTDRuntime.step_point``).

Torch-free (found by the reporter through ``suite.registry.report_modules``).
"""
from __future__ import annotations

from suite.records import DICT, INT, LIST, NUM
from suite.report.plugins import ReportPlugin, register
from suite.report.select import metric
from suite.workloads.measures import STEP_TIME

BLOCK = "metrics.extra.random_ltd"
FIELDS = {BLOCK: DICT, f"{BLOCK}.kept_length_schedule": LIST, f"{BLOCK}.kept_length_schedule[]": LIST + "!",
          f"{BLOCK}.kept_length_schedule[][]": INT, f"{BLOCK}.layer_tokens": NUM, f"{BLOCK}.dropping_layers": LIST,
          f"{BLOCK}.dropping_layers[]": INT}


def upgrade_v1(rec: dict) -> None:
    if metric(rec, "extra", "random_ltd") is None:
        return
    for m in rec["measures"]:
        if m["name"] == STEP_TIME.name and not m["point"]:
            m["compare"] = "info"
            m["summary"] = {**m.get("summary", {}),
                            "note": "schema 1: pooled over every kept length (the spread is the schedule)"}


register(ReportPlugin("random_ltd", upgrade_v1=upgrade_v1, fields=FIELDS))
