"""Record writing and reading (suite.records) and metric declarations (suite.metrics.declare).
Torch-free and fast."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from suite import RECORD_SCHEMA_VERSION
from suite.errors import UserError
from suite.metrics.declare import Metric, declare, measure
from suite.records import append_record, check_record, read_records

ROOT = Path(__file__).parent
# the committed records written in schema 1 (those of later runs are schema 2 already)
COMMITTED = [p for p in sorted((ROOT.parent / "reports" / "records").glob("*.jsonl"))
             if '"schema": 2' not in p.read_text()[:200]]
STEP = Metric("step_time", "s", "time", "lower", "median")


def ok_record(**metrics) -> dict:
    return {"status": "ok", "scenario": "s", "variant": "v", "is_baseline": True, "config_hash": "0" * 16,
            "config": {"workload": {"kind": "train"}}, "world_size": 2, "tp": 1, "pp": 2, "dp": 1,
            "metrics": {"step_time_s": {"median": 0.5, "p10": 0.4, "p90": 0.6, "n": 3}, **metrics}}


def test_metric_declarations_are_checked():
    with pytest.raises(ValueError, match="kind"):
        Metric("x", "s", "speed", "lower", "median")
    with pytest.raises(ValueError, match="tolerance"):
        Metric("x", "B", "memory", "lower", "tolerance")
    with pytest.raises(ValueError, match="paired"):
        Metric("x", "s", "time", "lower", "median", paired=True)
    declare(Metric("test_only_metric", "s", "time", "lower", "median"))
    declare(Metric("test_only_metric", "s", "time", "lower", "median"))  # the same again: fine
    with pytest.raises(ValueError, match="declared twice"):
        declare(Metric("test_only_metric", "s", "time", "higher", "median"))


def test_measure_keeps_samples_and_nulls_non_finite():
    m = measure(STEP, 0.5, [0.4, 0.5, float("nan")], phase=1)
    assert m["point"] == {"phase": 1} and m["samples"] == [0.4, 0.5, None]
    assert m["reason"] == "non-finite: 1 of 3 samples"
    bad = measure(STEP, float("inf"))
    assert bad["value"] is None and bad["reason"] == "non-finite: inf"
    json.dumps([m, bad], allow_nan=False)


def test_write_is_schema_2_with_layout_and_lifted_measures(tmp_path):
    rec = ok_record(measures=[measure(STEP, 0.5, [0.5])], layout={"cqil_degree": 2})
    append_record(tmp_path, rec)
    line = json.loads((tmp_path / "records.jsonl").read_text())
    assert line["schema"] == RECORD_SCHEMA_VERSION == 2
    assert line["layout"] == {"world_size": 2, "tp": 1, "pp": 2, "dp": 1, "cqil_degree": 2}
    assert [m["name"] for m in line["measures"]] == ["step_time"]
    assert "measures" not in line["metrics"] and "layout" not in line["metrics"]
    assert read_records(tmp_path)[0]["measures"] == line["measures"]


def test_non_finite_values_never_lose_a_record(tmp_path):
    """A diverged run's NaN loss used to raise in json.dumps(allow_nan=False): no record at all."""
    rec = ok_record(final_loss=float("nan"), validation_loss=float("-inf"),
                    loss_curve=[[1, 2.0], [2, float("nan")]],
                    measures=[measure(STEP, 0.5), {**measure(STEP, 0.5), "value": float("nan")}])
    append_record(tmp_path, rec)
    text = (tmp_path / "records.jsonl").read_text()
    line = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert line["metrics"]["final_loss"] is None and line["metrics"]["loss_curve"][1] == [2, None]
    assert line["non_finite"] == {"metrics.final_loss": "non-finite: nan",
                                  "metrics.validation_loss": "non-finite: -inf",
                                  "metrics.loss_curve[1][1]": "non-finite: nan",
                                  "measures[1].value": "non-finite: nan"}
    assert line["measures"][1]["value"] is None and line["measures"][1]["reason"] == "non-finite: nan"
    assert read_records(tmp_path)[0]["metrics"]["final_loss"] is None


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_v1_records_read_as_v2(path):
    for rec in read_records(path):
        assert rec["schema"] == 2 and rec["upgraded_from"] == 1
        assert {k: rec["layout"][k] for k in ("world_size", "tp", "pp", "dp")} == \
            {k: rec[k] for k in ("world_size", "tp", "pp", "dp")} or "cqil_degree" in rec["layout"]
        names = {m["name"] for m in rec["measures"]}
        if rec["status"] == "ok":
            assert names & {"step_time", "decode_latency", "heldout_loss"}, rec["variant"]
        for m in rec["measures"]:
            assert "samples" not in m  # v1 kept none
            assert m["value"] is None or math.isfinite(m["value"])


def test_v1_summary_becomes_a_median_measure(tmp_path):
    v1 = {"schema": 1, **ok_record(validation_loss=3.2, peak_memory_bytes=1e9)}
    (tmp_path / "records.jsonl").write_text(json.dumps(v1) + "\n")
    (rec,) = read_records(tmp_path)
    by = {m["name"]: m for m in rec["measures"]}
    assert by["step_time"]["value"] == 0.5 and by["step_time"]["summary"]["n"] == 3
    assert by["validation_loss"]["compare"] == "mean" and by["validation_loss"]["value"] == 3.2
    assert by["peak_memory"]["compare"] == "tolerance" and by["peak_memory"]["tolerance"] == 0.05


@pytest.mark.parametrize("content, expected", [
    (b"\x00\x01binary", "binary file"),
    (b'{"schema": 1}\n\xff\xfe\n', "line 2 is not UTF-8"),
    (b"[1, 2]\n", "line 1 is an array"),
    (b"null\n", "line 1 is null"),
    (b"42\n", "line 1 is a number"),
    (b"{}\n", "record schema None"),
    (b'{"schema": 2}\n', "no 'scenario'"),
    (b'{"schema": 2, "scenario": "s", "variant": "v", "status": "ok", "metrics": []}\n',
     "metrics = [], which is not an object"),
    (b'{"schema": 1, "scenario": "s", "variant": "v", "status": "ok", "metrics": {"step_time_s": "fast"}}\n',
     "metrics.step_time_s = \"fast\""),
    (b'{"schema": 2, "scenario": "s", "variant": "v", "status": "ok", "measures": [{"name": "x", "samples": ["a"]}]}\n',
     "measures[0].samples[0]"),
    (b'{"schema": true}\n', "record schema True"),
])
def test_bad_record_lines_are_user_errors(tmp_path, content, expected):
    path = tmp_path / "records.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        read_records(path)
    assert expected in str(e.value) and str(path) in str(e.value) and "Fix:" in str(e.value)


def test_check_record_accepts_what_the_writer_writes():
    assert check_record({**ok_record(), "measures": [measure(STEP, 0.5, [0.5])]}) is None


# ---------------------------------------------------------------------------------------------- any input

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FIXTURES = [ROOT / "data" / "report" / name for name in ("gpu.jsonl", "inference.jsonl", "v2_cpu.jsonl")] + \
    [ROOT.parent / "reports" / "records" / name for name in ("cqil_accuracy_h200.jsonl", "gpt_multilevel_h200x4.jsonl",
                                                             "gpt_random_ltd_h100.jsonl", "llama33b_h200x4.jsonl")]
# every workload's schema-2 records (v2_cpu), and a few schema-1 records of each committed kind
BASES = [json.loads(line) for path in FIXTURES
         for line in path.read_text().splitlines()[:None if path.name == "v2_cpu.jsonl" else 3]]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


def _paths(value, prefix=()):
    """Every (key or index) path into a record, so a mutation can hit any field at any depth."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        yield from _paths(sub, prefix + (key,))


@st.composite
def mutated_record(draw):
    rec = copy.deepcopy(draw(st.sampled_from(BASES)))
    paths = [p for p in _paths(rec) if p]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = rec
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(JSON)
        except (KeyError, IndexError, TypeError):  # an earlier mutation replaced a parent
            pass
    return json.dumps(rec, allow_nan=True)


LINE = st.one_of(mutated_record(), mutated_record(), JSON.map(lambda v: json.dumps(v, allow_nan=True)),
                 st.binary(max_size=40).map(lambda b: b.decode("latin-1")), st.text(max_size=30))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(lines=st.lists(LINE, min_size=1, max_size=3), fmt=st.sampled_from(["markdown", "csv", "json"]),
       encode=st.sampled_from(["utf-8", "latin-1"]))
def test_report_on_any_record_file_exits_0_or_2_without_traceback(tmp_path_factory, capsys, lines, fmt, encode):
    """`suite report FILE` either renders or says, in one line, what is wrong with which line: never a
    traceback, whatever the file holds (mutated real records, arbitrary JSON, bytes)."""
    from suite.cli import main

    path = tmp_path_factory.mktemp("records") / "records.jsonl"
    path.write_bytes("\n".join(lines).encode(encode, errors="replace"))
    code = main(["report", str(path), "--format", fmt])  # a crash raises here and fails the test
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and str(path) in err and "Fix:" in err


def test_v1_variable_shape_runs_never_get_one_pooled_gated_step_time():
    """Plug-ins upgrade their schema-1 records: a V-cycle gets a step time per phase (mean of its steps,
    the level change excluded), random-LTD's pooled spread becomes information only."""
    records = ROOT.parent / "reports" / "records"
    vcycle = next(r for r in read_records(records / "gpt_multilevel_h200x4.jsonl") if r["variant"] == "multilevel_2")
    phases = vcycle["metrics"]["extra"]["multilevel"]["phases"]
    times = [m for m in vcycle["measures"] if m["name"] == "step_time"]
    assert [m["point"] for m in times] == [{"phase": p["phase"], "shape": f"{p['layers']}x{p['hidden']}"}
                                           for p in phases]
    one = phases[1]
    assert times[1]["value"] == pytest.approx((one["walltime_s"] - one["transition_s"]) / one["steps"])
    ltd = next(r for r in read_records(records / "gpt_random_ltd_h100.jsonl") if "random_ltd" in r["variant"])
    (pooled,) = [m for m in ltd["measures"] if m["name"] == "step_time"]
    assert pooled["compare"] == "info" and pooled["point"] == {}


def test_v1_cqil_degree_moves_from_dp_to_the_layout():
    records = ROOT.parent / "reports" / "records" / "llama33b_h200x4.jsonl"
    by = {r["variant"]: r for r in read_records(records)}
    assert by["cqil2"]["dp"] == 2 and by["cqil2"]["layout"]["cqil_degree"] == 2 and by["cqil2"]["layout"]["dp"] == 1
    assert "cqil_degree" not in by["tp2"]["layout"]
