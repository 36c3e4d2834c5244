"""Which records a report or a comparison looks at, and the per-record numbers both derive."""
from __future__ import annotations

from collections import Counter

from suite.errors import UserError
from suite.records import latest_by_variant, read_records


def load_records(paths) -> list[dict]:
    """Every record of the given folders/files, in order; none is a user error."""
    records = read_records(*paths)
    if not records:
        raise UserError("no records found.", file=", ".join(map(str, paths)),
                        fix="point at a results folder that `suite run` has written records to.")
    return records


def load_latest(paths) -> dict[tuple[str, str], dict]:
    """The latest record of each (scenario, variant) over all given folders/files, first-seen order."""
    return latest_by_variant(load_records(paths))


def superseded(records: list[dict]) -> dict[tuple[str, str], int]:
    """How many earlier records each re-run (scenario, variant) has: a report shows the latest of each, and
    says what it left out."""
    counts = Counter((r["scenario"], r["variant"]) for r in records)
    return {key: n - 1 for key, n in counts.items() if n > 1}


def baseline_of(records: list[dict]) -> dict:
    """The variant marked is_baseline; the first one when none is marked (as the scenario default)."""
    return next((r for r in records if r.get("is_baseline")), records[0])


def by_scenario(latest: dict[tuple[str, str], dict]) -> dict[str, list[dict]]:
    """Records grouped by scenario, each group with its baseline first, otherwise in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for (scenario, _), rec in latest.items():
        groups.setdefault(scenario, []).append(rec)
    for scenario, recs in groups.items():
        base = baseline_of(recs)
        groups[scenario] = [base] + [r for r in recs if r is not base]
    return groups


def is_ok(rec: dict) -> bool:
    return rec.get("status") == "ok"


def metric(rec: dict, *keys):
    """rec["metrics"][k1][k2]..., or None when any level is missing (failed records have no metrics)."""
    value = rec.get("metrics")
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def step_median_s(rec: dict) -> float | None:
    return metric(rec, "step_time_s", "median")


def step_half_spread_s(rec: dict) -> float | None:
    """Half the p10-p90 spread of the timed steps: the '±' of the median."""
    p10, p90 = metric(rec, "step_time_s", "p10"), metric(rec, "step_time_s", "p90")
    return None if p10 is None or p90 is None else (p90 - p10) / 2


def relative_change(new: float | None, old: float | None) -> float | None:
    """(new - old) / old, or None when either side is unknown."""
    return None if new is None or not old else (new - old) / old


def failure(rec: dict) -> str:
    """'<status>: <type>: <first line of message>' for a record that is not ok ('failed', 'diverged',
    'interrupted', 'skipped')."""
    error = rec.get("error") if isinstance(rec.get("error"), dict) else {}
    message = str(error.get("message") or "").strip().splitlines()
    status = rec.get("status") or "failed"
    kind = str(error.get("type") or "unknown error")
    # a status that already says what happened ('skipped', 'diverged') is not repeated as its type
    prefix = status if kind.lower() == status.lower() else f"{status}: {kind}"
    return prefix + (f": {message[0]}" if message else "")


def machine(env: dict | None) -> str | None:
    """'<GPU name> × <count>', 'CPU' when the record ran without a GPU, None when it has no env
    (the launcher's record of a crashed torchrun)."""
    if env is None:
        return None
    if not env.get("gpu_name") or not env.get("gpu_count"):
        return "CPU"
    return f"{env['gpu_name']} × {env['gpu_count']}"
