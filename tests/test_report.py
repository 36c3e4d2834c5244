"""`suite report`: tables from result records (the regression gate, `suite compare`: tests/test_compare.py).

Fast, CPU only and torch-free. Fixtures in tests/data/report/ are schema-v1 records with realistic
values: cpu/records.jsonl (a 2-process CPU run of `tiny`, one variant re-run so the latest record
must win), gpu.jsonl (`gpt-1b` on 8 x H100, one variant failed with an OOM) and gpu-next.jsonl (the
next night: one variant within noise, one slower, one faster, the failed one fixed, one new).
inference.jsonl holds inference records (`workload.kind = "inference"`, trimmed config): cqil_tiny/single
and llama7b_cqil/single are real H100 records; cqil_tiny/cqil2 is constructed from cqil_tiny/single
(dp = CQIL degree 2, metrics.cqil of the scenario's plan, decode times x0.84 with CUDA graphs and x0.95
eager, prefill x0.97 / x1.02, graph_logits_rel_diff added) so that the latency cut has a real Δ and
a Δ within noise.

Golden files: report.md in tests/data/report/ is the expected output (compare.md: tests/test_compare.py), compared
exactly. After an intended change of the output, regenerate them and review the diff:

    SUITE_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py

Numbers asserted here are recomputed from the fixture values, not read back from the reporter.
"""
from __future__ import annotations

import copy
import csv
import difflib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from suite.report.render import build_rows
from suite.report.select import load_latest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("tests/data/report")  # relative to ROOT: paths appear in the output, goldens must not depend on it
CPU, GPU, GPU_NEXT = DATA / "cpu", DATA / "gpu.jsonl", DATA / "gpu-next.jsonl"
INFERENCE = DATA / "inference.jsonl"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "suite", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def check_golden(name: str, text: str) -> None:
    path = ROOT / DATA / name
    if os.environ.get("SUITE_UPDATE_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
        return
    expected = path.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "output"))
    assert text == expected, f"output differs from {path} (SUITE_UPDATE_GOLDEN=1 rewrites it):\n{diff}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in (ROOT / path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cells(line: str) -> list[str]:
    """The cells of one markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def table_line(text: str, first_cell: str) -> str:
    return next(l for l in text.splitlines() if l.startswith(f"| {first_cell} |"))


def by_variant(records: list[dict]) -> dict[str, dict]:
    return {r["variant"]: r for r in records}


# ---------------------------------------------------------------------------------------------- torch-free


def test_reporter_never_imports_torch():
    """Also every plug-in's report module (suite.registry.report_modules) and the record reader."""
    code = ("import suite.report.render, suite.report.compare, suite.report.plugins as p, suite.records, sys; "
            "p.plugins(); "
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------- report


def test_report_markdown_golden():
    proc = run_cli("report", CPU, GPU)
    assert proc.returncode == 0, proc.stderr
    check_golden("report.md", proc.stdout)


def test_report_output_file_equals_stdout_and_names_its_command(tmp_path):
    out = tmp_path / "sub" / "report.md"
    assert run_cli("report", CPU, GPU, "-o", out).returncode == 0
    parts = run_cli("report", CPU, GPU).stdout.split("\n\n")
    parts.insert(2, f"Rendered by: `python -m suite report {CPU} {GPU} -o {out}`")  # after the Records line
    assert out.read_text(encoding="utf-8") == "\n\n".join(parts)


def test_a_report_names_the_runs_it_leaves_out(tmp_path):
    """A variant run three times shows its latest record and says two earlier ones are not shown; a variant
    run once is not named."""
    lines = (ROOT / GPU).read_text().splitlines()
    first = json.loads(lines[0])
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join([lines[0], lines[0], *lines]) + "\n")
    text = run_cli("report", path).stdout
    note = next(line for line in text.splitlines() if line.startswith("Re-run variants:"))
    assert note.endswith(f"not shown: {first['scenario']}/{first['variant']} (2).")
    assert run_cli("report", GPU).stdout.count("Re-run variants:") == 0


def test_a_scenario_of_several_workload_kinds_reports_each_kind():
    """The nightly baseline holds training (with random-LTD and a V-cycle), inference and accuracy variants
    of one scenario: each kind gets its own part, compared with its own baseline, and skipped variants say
    why once."""
    proc = run_cli("report", "reports/baselines/nightly_h200.jsonl")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    parts = ["### Training", "### Per schedule position", "### V-cycle phases", "### Latency", "### Accuracy"]
    assert all(p in text for p in parts) and [text.index(p) for p in parts] == sorted(text.index(p) for p in parts)
    assert cells(table_line(text, "recompute"))[0] == "recompute"  # a training row, not lost
    assert cells(table_line(text.split("### Latency")[1], "decode (baseline)"))[-1] == "—"  # its own kind's baseline
    assert "accuracy_cqil2 |" in text.split("### Accuracy")[1]
    assert "skipped: needs 2 GPUs" in text and "Skipped: needs" not in text


def test_latest_record_per_variant_wins():
    # cpu/records.jsonl holds dp twice: 64.0 ms (2025-11-23), then the re-run at 51.2 ms.
    rows = build_rows(load_latest([ROOT / CPU]))
    assert [r["variant"] for r in rows] == ["dp", "tp2", "pp2"]
    assert rows[0]["step_time_median_ms"] == pytest.approx(51.2)
    assert rows[0]["date"] == "2025-11-24"


def test_deltas_against_baseline_are_computed_independently():
    recs = by_variant(read_jsonl(CPU / "records.jsonl")[1:])  # the re-run of dp, tp2, pp2
    base, tp2 = recs["dp"]["metrics"], recs["tp2"]["metrics"]
    rows = {r["variant"]: r for r in build_rows(load_latest([ROOT / CPU]))}

    a, b = base["step_time_s"]["median"], tp2["step_time_s"]["median"]
    assert rows["tp2"]["delta_step_time_pct"] == pytest.approx((b - a) / a * 100)
    assert rows["tp2"]["delta_flops_per_step_pct"] == pytest.approx(0.0)
    assert rows["tp2"]["delta_validation_loss"] == pytest.approx(tp2["validation_loss"] - base["validation_loss"])
    assert rows["tp2"]["step_time_half_spread_ms"] == pytest.approx(
        (tp2["step_time_s"]["p90"] - tp2["step_time_s"]["p10"]) / 2 * 1e3)

    row = cells(table_line(run_cli("report", CPU).stdout, "tp2"))
    assert row[14] == f"{(b - a) / a * 100:+.1f}%" == "+43.4%"
    assert row[5] == f"{b * 1e3:.1f} ± {(tp2['step_time_s']['p90'] - tp2['step_time_s']['p10']) / 2 * 1e3:.1f}"


def test_baseline_row_comes_first_and_is_marked(tmp_path):
    records = read_jsonl(GPU)
    moved = write_jsonl(tmp_path / "r.jsonl", records[1:] + records[:1])  # baseline record last in the file
    names = [cells(l)[0] for l in run_cli("report", moved).stdout.splitlines() if l.startswith("| ")]
    assert names == ["variant", "bf16 (baseline)", "bf16-tp2", "fp8", "fp8-blockwise"]


def test_failed_variant_row_names_error_type_and_first_line():
    out = run_cli("report", GPU).stdout
    row = cells(table_line(out, "fp8-blockwise"))
    assert row[:3] == ["fp8-blockwise", "tp1 pp1 dp8", "8"]
    assert row[3].startswith("**failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "Including non-PyTorch" not in out  # the message's second line stays out
    assert len(row) == len(cells(table_line(out, "variant")))


def test_header_machine_and_cpu_footnote():
    out = run_cli("report", CPU, GPU).stdout
    cpu_part, gpu_part = out.split("## gpt-1b")
    assert "CPU · torch 2.13.0+cpu · megatron-core 0.16.1 · commit 777769f0a5c3-dirty · 2025-11-24" in cpu_part
    assert "NVIDIA H100 80GB HBM3 × 8 · torch 2.9.1+cu128" in gpu_part
    assert "0.60 †" in cpu_part and "host peak RSS" in cpu_part
    assert "†" not in gpu_part  # GPU memory is device memory: no footnote
    assert out.count("differences smaller than the step-time spread are noise") == 2


def test_launcher_failure_without_env_does_not_claim_cpu(tmp_path):
    # A torchrun that dies before rank 0 writes leaves a launcher record with "env": null.
    crashed = {**read_jsonl(GPU)[3], "variant": "fp8-tp4", "env": None, "tp": 4, "dp": 2,
               "error": {"type": "ProcessExit", "message": "torchrun exited with code 1", "traceback": "",
                         "rank": None}}
    out = run_cli("report", write_jsonl(tmp_path / "r.jsonl", read_jsonl(GPU) + [crashed])).stdout
    assert "\nNVIDIA H100 80GB HBM3 × 8 · torch 2.9.1+cu128 ·" in out and "CPU" not in out
    assert cells(table_line(out, "fp8-tp4"))[3] == "**failed: ProcessExit: torchrun exited with code 1**"


def test_optional_columns_only_where_present():
    out = run_cli("report", CPU, GPU).stdout
    cpu_part, gpu_part = out.split("## gpt-1b")
    assert "target." not in cpu_part and "extra." not in cpu_part
    header = cells(table_line(gpu_part, "variant"))
    for column in ("target.reached", "target.tokens", "target.walltime_s", "target.flops", "extra.fp8.recipe"):
        assert column in header


def heldout(loss: float, bytes_per_token: float = 1.0, tokens: int = 1024) -> dict:
    """A metrics.heldout block (loss of a real CPU run of tests/scenarios/runner/equivalence.toml)."""
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": loss / (bytes_per_token * math.log(2)),
            "tokens": tokens, "bytes": round(tokens * bytes_per_token), "seq_length": 64}


def test_heldout_columns_follow_val_loss_where_measured(tmp_path):
    cpu = read_jsonl(CPU / "records.jsonl")
    for rec in cpu:
        if rec["variant"] in ("dp", "tp2"):  # pp2 has none: n/a
            rec["metrics"]["heldout"] = heldout(4.598555006086826 if rec["variant"] == "dp" else 4.7)
    gpu = read_jsonl(GPU)
    by_variant(gpu)["bf16"]["metrics"]["heldout"] = heldout(2.5, bytes_per_token=4.2, tokens=65536)
    out = run_cli("report", write_jsonl(tmp_path / "cpu.jsonl", cpu), write_jsonl(tmp_path / "gpu.jsonl", gpu)).stdout
    cpu_part, gpu_part = out.split("## gpt-1b")
    header = cells(table_line(cpu_part, "variant"))
    at = header.index("val loss") + 1
    assert header[at:at + 3] == ["held-out ppl", "bits/byte", "energy (kJ)"]
    dp, tp2, pp2 = (cells(table_line(cpu_part, name)) for name in ("dp (baseline)", "tp2", "pp2"))
    assert dp[at:at + 2] == [f"{math.exp(4.598555006086826):.2f}", f"{4.598555006086826 / math.log(2):.4f}"] \
        == ["99.34", "6.6343"]
    assert tp2[at:at + 2] == [f"{math.exp(4.7):.2f}", f"{4.7 / math.log(2):.4f}"]
    assert pp2[at:at + 2] == ["n/a", "n/a"]
    assert len(dp) == len(pp2) == len(header)
    assert "Held-out ppl and bits/byte: the final model on the start of the validation tail (1,024 tokens" in cpu_part
    # a bits-per-byte of 4.2 bytes a token (a BPE); the failed row keeps its width
    gpu_header = cells(table_line(gpu_part, "variant"))
    bf16 = cells(table_line(gpu_part, "bf16 (baseline)"))
    at = gpu_header.index("held-out ppl")
    assert bf16[at:at + 2] == [f"{math.exp(2.5):.2f}", f"{2.5 / 4.2 / math.log(2):.4f}"] == ["12.18", "0.8587"]
    assert len(cells(table_line(gpu_part, "fp8-blockwise"))) == len(gpu_header)
    assert "(65,536 tokens" in gpu_part
    # without any heldout block: no columns, no note (tests/data/report's records)
    plain = run_cli("report", CPU).stdout
    assert "held-out ppl" not in plain and "bits/byte" not in plain and "Held-out" not in plain
    rows = {r["variant"]: r for r in build_rows(load_latest([tmp_path / "cpu.jsonl"]))}
    assert rows["dp"]["heldout.perplexity"] == pytest.approx(99.34066, rel=1e-6)
    assert rows["dp"]["heldout.tokens"] == 1024 and "heldout.bpb" not in rows["pp2"]


def test_null_metrics_render_as_na():
    row = cells(table_line(run_cli("report", CPU).stdout, "dp (baseline)"))
    # MFU, fraction of GEMM ceiling and energy are null on CPU.
    assert row[8] == row[9] == row[13] == "n/a"


def test_csv_one_row_per_variant(tmp_path):
    out = tmp_path / "r.csv"
    assert run_cli("report", CPU, GPU, "--format", "csv", "-o", out).returncode == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [(r["scenario"], r["variant"]) for r in rows] == [
        ("tiny", "dp"), ("tiny", "tp2"), ("tiny", "pp2"),
        ("gpt-1b", "bf16"), ("gpt-1b", "bf16-tp2"), ("gpt-1b", "fp8"), ("gpt-1b", "fp8-blockwise")]
    assert rows[5]["extra.fp8.recipe"] == "delayed" and rows[0]["extra.fp8.recipe"] == ""
    assert rows[6]["status"] == "failed" and rows[6]["error"].startswith("failed: OutOfMemoryError")
    assert float(rows[3]["step_time_median_ms"]) == pytest.approx(412.0)
    # every declared measure is a column too (schema-1 records: the measures derived on read)
    assert float(rows[3]["measure.step_time (s)"]) == pytest.approx(0.412)


def test_json_rows():
    proc = run_cli("report", GPU, "--format", "json")
    rows = by_variant(json.loads(proc.stdout))
    recs = by_variant(read_jsonl(GPU))
    a, b = (recs[v]["metrics"]["step_time_s"]["median"] for v in ("bf16", "fp8"))
    assert rows["fp8"]["delta_step_time_pct"] == pytest.approx((b - a) / a * 100)
    assert rows["fp8"]["mfu"] == recs["fp8"]["metrics"]["mfu"]
    assert rows["fp8"]["target.reached"] is True and rows["fp8"]["extra.fp8.amax_history_len"] == 16
    assert rows["bf16"]["baseline"] is True and rows["bf16"]["delta_step_time_pct"] == 0
    assert rows["fp8-blockwise"]["step_time_median_ms"] is None


def test_report_missing_path_is_a_user_error():
    proc = run_cli("report", "tests/data/report/no-such-folder")
    assert proc.returncode == 2
    assert "no results at" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- inference


def test_inference_report_markdown_golden():
    proc = run_cli("report", INFERENCE)
    assert proc.returncode == 0, proc.stderr
    check_golden("inference.md", proc.stdout)
    assert "step time (ms)" not in proc.stdout  # no all-n/a training table


def test_latency_cut_is_computed_independently():
    recs = by_variant([r for r in read_jsonl(INFERENCE) if r["scenario"] == "cqil_tiny"])
    point = lambda rec: next(e for e in rec["metrics"]["inference"] if e["batch"] == 2 and e["cuda_graph"])
    base, cqil = point(recs["single"]), point(recs["cqil2"])
    a, b = base["decode_ms_median"], cqil["decode_ms_median"]
    spreads = [(e["decode_ms_p90"] - e["decode_ms_p10"]) / 2 / e["decode_ms_median"] for e in (base, cqil)]
    assert abs(b - a) / a > max(spreads)  # a real cut, not noise

    rows = [r for r in build_rows(load_latest([ROOT / INFERENCE])) if r.get("row") == "latency"]
    row = next(r for r in rows if r["variant"] == "cqil2" and r["batch"] == 2 and r["cuda_graph"])
    assert row["delta_decode_pct"] == pytest.approx((b - a) / a * 100) and not row["delta_decode_noise"]
    pa, pb = base["prefill_ms_median"], cqil["prefill_ms_median"]
    assert row["delta_prefill_pct"] == pytest.approx((pb - pa) / pa * 100) and row["delta_prefill_noise"]

    out = run_cli("report", INFERENCE).stdout
    line = next(l for l in out.splitlines() if l.startswith("| cqil2 | 2 | 16 | 4 | graph |"))
    assert cells(line)[-2] == f"{(b - a) / a * 100:+.1f}%" == "-16.0%"
    assert cells(line)[5] == f"{pb:.1f} ± {(cqil['prefill_ms_p90'] - cqil['prefill_ms_p10']) / 2:.1f}"
    eager = next(l for l in out.splitlines() if l.startswith("| cqil2 | 2 | 16 | 4 | eager |"))
    assert cells(eager)[-2] == "-5.0% (noise)"
    assert "| tp1 × cqil2 | 2 |" in out  # layout: the record's dp holds the CQIL degree
    assert "sequential depth 6 of 8 layers (6 per GPU); ideal decode cut 25.0%" in out  # 1 - 6/8


def test_latency_rows_in_csv_and_json_leave_training_rows_alone(tmp_path):
    training = json.loads(run_cli("report", CPU, GPU, "--format", "json").stdout)
    both = json.loads(run_cli("report", CPU, GPU, INFERENCE, "--format", "json").stdout)
    assert both[:len(training)] == training and all("row" not in r for r in training)
    latency = [r for r in both[len(training):] if r.get("row") == "latency"]
    assert len(latency) == 4 + 4 + 2  # single and cqil2 of cqil_tiny, single of llama7b_cqil
    assert {r["layout"] for r in latency if r["variant"] == "cqil2"} == {"tp1 × cqil2"}
    l7 = [r for r in latency if r["scenario"] == "llama7b_cqil"]
    assert [r["cuda_graph"] for r in l7] == [False, True] and l7[1]["same_tokens_as_eager"] is False

    out = tmp_path / "r.csv"
    assert run_cli("report", INFERENCE, "--format", "csv", "-o", out).returncode == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [r["row"] for r in rows].count("latency") == 10
    assert rows[2]["variant"] == "single" and rows[2]["cuda_graph"] == "False"  # after the 2 variant rows
    assert float(rows[2]["decode_ms_median"]) == pytest.approx(17.27236843109131)


# ---------------------------------------------------------------------------------------------- record input
# (the regression gate's own tests are in tests/test_compare.py)


def test_missing_results_path_exits_2_without_traceback(tmp_path):
    proc = run_cli("compare", tmp_path / "nowhere", GPU)
    assert proc.returncode == 2
    assert "no results at" in proc.stderr and "Traceback" not in proc.stderr


def test_malformed_json_line_exits_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((ROOT / GPU).read_text().splitlines()[0] + "\n{\"schema\": 1, \"status\": \n")
    proc = run_cli("compare", bad, GPU)
    assert proc.returncode == 2
    assert "line 2 is not JSON" in proc.stderr and "Traceback" not in proc.stderr


def test_cost_at_equal_quality_reads_the_first_point_at_or_below_target():
    """The equal-quality view: first validation <= target, its FLOPs/walltime, and Δ vs baseline."""
    from suite.report.quality import quality_rows

    def rec(variant, curve, baseline=False, target=None):
        metrics = {"steps": curve[-1][0], "tokens": curve[-1][0] * 100, "validation_loss": curve[-1][1],
                   "validation_curve": curve}
        if target is not None:
            metrics["target"] = {"target_loss": target}
        return {"variant": variant, "status": "ok", "is_baseline": baseline, "metrics": metrics}

    base = rec("base", [[10, 3.0, 1.0, 100], [20, 2.0, 2.0, 200], [30, 1.5, 3.0, 300]], baseline=True)
    fast = rec("fast", [[10, 2.5, 0.5, 60], [20, 1.4, 1.2, 130], [30, 1.2, 1.9, 190]])
    never = rec("never", [[10, 2.9, 0.4, 50], [20, 2.2, 0.8, 100]])
    target, rows = quality_rows([base, fast, never])
    assert target == 1.5  # the baseline's final validation loss
    by = {r["variant"]: r for r in rows}
    assert (by["base"]["step"], by["base"]["flops"], by["base"]["walltime_s"]) == (30, 300, 3.0)
    assert (by["fast"]["step"], by["fast"]["tokens"]) == (20, 2000)
    assert by["fast"]["delta_flops_pct"] == pytest.approx(100 * (130 - 300) / 300)
    assert by["fast"]["delta_walltime_pct"] == pytest.approx(100 * (1.2 - 3.0) / 3.0)
    assert not by["never"]["reached"]
    # an explicit target in any record wins over the baseline's final loss
    target, rows = quality_rows([base, rec("t", [[10, 2.1, 1, 1], [20, 1.9, 2, 2]], target=2.0)])
    assert target == 2.0 and {r["variant"]: r["step"] for r in rows} == {"base": 20, "t": 20}
    # and the reader's target (suite report --target-loss) wins over both
    target, rows = quality_rows([base, fast, never], asked=2.5)
    assert target == 2.5 and {r["variant"]: r.get("step") for r in rows} == {"base": 20, "fast": 10, "never": 20}


def seeded(variant, seed, curve, baseline=False, lr=1e-3):
    """A training record with a validation curve and the config fields the seed grouping reads."""
    return {"variant": variant, "status": "ok", "is_baseline": baseline,
            "config": {"workload": {"seed": seed, "lr": lr}, "model": {"num_layers": 2}},
            "metrics": {"steps": curve[-1][0], "tokens": curve[-1][0] * 100, "validation_loss": curve[-1][1],
                        "validation_curve": curve}}


def test_seed_repeats_get_mean_costs_and_the_delta_of_the_means():
    """Variants that differ only in workload.seed form one configuration: mean steps, FLOPs and walltime
    over the seeds, Δ between means; a configuration where one seed misses the target has no mean."""
    from suite.report.quality import quality_section

    records = [
        seeded("base", 1, [[10, 2.0, 1.0, 100], [20, 1.5, 2.0, 200]], baseline=True),
        seeded("base_seed2", 2, [[10, 1.45, 1.2, 100], [20, 1.4, 2.4, 200]]),
        seeded("fast", 1, [[10, 1.5, 0.5, 50], [20, 1.2, 1.0, 100]], lr=2e-3),
        seeded("fast_seed2", 2, [[10, 1.9, 0.6, 50], [20, 1.5, 1.2, 100]], lr=2e-3),
        seeded("flaky", 1, [[10, 1.5, 0.5, 60]], lr=3e-3),
        seeded("flaky_seed2", 2, [[10, 1.7, 0.5, 60]], lr=3e-3),
    ]
    text = "\n".join(quality_section(records, asked=1.5))
    means = text[text.index("Mean over seeds"):]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in means.splitlines() if line.startswith("| ")]
    rows = {c[0]: c for c in cells}
    # base: both seeds reach 1.5 at step 20 and 10 -> mean step 15, FLOPs 150, walltime (2.0 + 1.2) / 2
    assert rows["base (baseline)"][1:6] == ["1, 2", "2/2", "15", "150", "1.6 (1.2–2.0)"]
    # fast: step 10 and 20 -> FLOPs (50 + 100) / 2 = 75, walltime (0.5 + 1.2) / 2 = 0.85
    assert rows["fast"][1:4] == ["1, 2", "2/2", "15"] and rows["fast"][4] == "75"
    # Δ with the 95% interval of the ratio of means (worked by hand for FLOPs: means 75 / 150, variances
    # 1250 / 5000, SE of the log ratio sqrt(1250 / (2 * 75²) + 5000 / (2 * 150²)) = 0.4714, Welch df 2,
    # t = 4.303: 0.5 * exp(-/+ 2.028) = 0.066 .. 3.80)
    assert rows["fast"][6] == "-50.0% [-93.4%, +280.1%]"
    assert rows["fast"][7].startswith("-46.9% [")
    assert rows["flaky"][2] == "1/2" and rows["flaky"][3:5] == ["n/a", "n/a"]


def test_walltime_to_target_with_and_without_start_up():
    """Records with metrics.warmup_walltime_s also show the walltime to the target without start-up (minus
    it, for points past warm-up), for every variant alike; a record without it says 'start-up included';
    tables of records without it are unchanged (the committed reports' re-render test covers that)."""
    from suite.report.quality import quality_rows, quality_section

    def with_startup(rec, warm, warmup_steps=2):
        rec["metrics"]["warmup_walltime_s"] = warm
        rec["config"]["workload"]["warmup_steps"] = warmup_steps
        return rec

    base = with_startup(seeded("base", 1, [[10, 2.0, 3.0, 100], [20, 1.5, 5.0, 200]], baseline=True), 1.0)
    fast = with_startup(seeded("fast", 1, [[10, 1.5, 2.5, 50]], lr=2e-3), 2.0)
    early = with_startup(seeded("early", 1, [[2, 1.4, 0.9, 10]], lr=4e-3), 0.9)  # reached within warm-up
    old = seeded("old", 1, [[10, 1.5, 2.0, 60]], lr=3e-3)  # written before warmup_walltime_s
    _, rows = quality_rows([base, fast, early, old], asked=1.5)
    by = {r["variant"]: r for r in rows}
    assert by["base"]["walltime_after_startup_s"] == 4.0 and by["fast"]["walltime_after_startup_s"] == 0.5
    assert by["fast"]["delta_walltime_after_startup_pct"] == pytest.approx(100 * (0.5 - 4.0) / 4.0)
    assert by["early"]["has_startup"] and by["early"]["walltime_after_startup_s"] is None
    assert not by["old"]["has_startup"]
    text = "\n".join(quality_section([base, fast, early, old], asked=1.5))
    cells = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in text.splitlines()
                               if line.startswith("| "))}
    assert "walltime w/o start-up (s)" in cells["variant"] and "Δ walltime w/o start-up" in cells["variant"]
    assert cells["fast"][4:6] == ["2.5", "0.5"] and cells["fast"][-1] == "-87.5%"
    assert cells["old"][5] == "start-up included" and cells["early"][5] == "n/a"
    plain = "\n".join(quality_section([seeded("a", 1, [[10, 2.0, 1, 1], [20, 1.5, 2, 2]], baseline=True),
                                        seeded("b", 1, [[10, 1.5, 1, 1]], lr=2e-3)], asked=1.5))
    assert "start-up" not in plain


def test_no_seed_table_without_repeats():
    from suite.report.quality import quality_section

    text = "\n".join(quality_section([seeded("a", 1, [[10, 2.0, 1, 1], [20, 1.5, 2, 2]], baseline=True),
                                      seeded("b", 1, [[10, 1.5, 1, 1]], lr=2e-3)]))
    assert "Cost to reach" in text and "Mean over seeds" not in text
    # records without a config (hand-written ones) are never taken for repeats of each other
    bare = [seeded("a", 1, [[10, 1.5, 1, 1]], baseline=True), seeded("b", 1, [[10, 1.4, 1, 1]])]
    for r in bare:
        del r["config"]
    assert "Mean over seeds" not in "\n".join(quality_section(bare))


# ---------------------------------------------------------------------------------------------- loss curves


def with_curves(records: list[dict]) -> list[dict]:
    """Copies of the ok records with validation curves as the runner writes them ([step, loss, walltime, FLOPs])."""
    out = copy.deepcopy([r for r in records if r["status"] == "ok"])
    for i, rec in enumerate(out):
        loss = rec["metrics"]["validation_loss"]
        rec["metrics"]["validation_curve"] = [[10, loss + 1.0, 1.0 + i, 1e15], [20, loss + 0.3, 2.0 + i, 2e15],
                                              [30, loss, 3.0 + i, 3e15]]
    return out


IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


def test_report_with_curves_writes_one_png_per_scenario_and_links_it(tmp_path):
    curves = write_jsonl(tmp_path / "curves.jsonl", with_curves(read_jsonl(GPU)))
    out = tmp_path / "out" / "report.md"
    proc = run_cli("report", CPU, curves, "-o", out)  # tiny: no curves with costs, so no plot
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    links = IMAGE_LINK.findall(text)
    assert links == ["report-gpt-1b.png"]  # relative to the markdown file
    assert "![" not in text.split("## gpt-1b")[0]  # the plot is gpt-1b's, under its quality table
    assert text.index("### Cost to reach validation loss") < text.index("![")
    assert (out.parent / links[0]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in out.parent.iterdir()) == ["report-gpt-1b.png", "report.md"]


def test_report_without_curves_writes_no_png_and_no_link(tmp_path):
    out = tmp_path / "report.md"
    assert run_cli("report", CPU, GPU, "-o", out).returncode == 0
    text = out.read_text(encoding="utf-8")
    assert "![" not in text and "Loss curves" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_loss_curves_not_drawn_without_matplotlib_or_without_a_file(tmp_path, monkeypatch):
    from suite.report.render import markdown

    curves = write_jsonl(tmp_path / "curves.jsonl", with_curves(read_jsonl(GPU)))
    latest = load_latest([curves])
    assert "Loss curves not drawn: the report went to stdout" in markdown(latest, [curves])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    text = markdown(latest, [curves], tmp_path / "report.md")
    assert "Loss curves not drawn: matplotlib is not installed" in text and "![" not in text
    assert not list(tmp_path.glob("*.png"))


def test_vcycle_curve_shows_every_phase():
    """A V-cycle record's validation_curve holds its final phase only; the plot reads all phases from extra."""
    from suite.report.plots import curve

    every = [[10, 3.0, 1.0, 100, 0], [20, 2.8, 1.5, 130, 1], [30, 2.5, 2.5, 230, 2]]
    rec = {"metrics": {"validation_curve": [every[-1][:4]], "extra": {"multilevel": {"validation_curve": every}}}}
    assert curve(rec) == every
    assert curve({"metrics": {"validation_curve": [[10, 3.0, 1.0, 100], [20, 2.9]]}}) == [[10, 3.0, 1.0, 100, 0]]


def test_fastest_variant_per_point_and_gpu_count():
    out = run_cli("report", INFERENCE).stdout
    for scenario in ("cqil_tiny", "llama7b_cqil"):
        recs = [r for r in read_jsonl(INFERENCE) if r["scenario"] == scenario]
        section = out.split(f"## {scenario}")[1].split("\n## ")[0]
        for e in recs[0]["metrics"]["inference"]:
            key = (e["batch"], e["prompt"], e["gen"], e["cuda_graph"])
            best = {}  # GPUs -> (decode ms, variant), from the records directly
            for r in recs:
                for p in r["metrics"]["inference"]:
                    if (p["batch"], p["prompt"], p["gen"], p["cuda_graph"]) == key:
                        best[r["world_size"]] = min(best.get(r["world_size"], (float("inf"), "")),
                                                    (p["decode_ms_median"], r["variant"]))
            name = f"b{key[0]} p{key[1]} g{key[2]} {'graph' if key[3] else 'eager'}"
            line = next(x for x in section.splitlines() if x.startswith(f"- {name}: decode: "))
            decode = line.split("; TTFT")[0].split("decode: ")[1]  # "1 GPU single 23.2 ms, 2 GPUs cqil2 14.4 ms"
            shown = [part.rsplit(" ", 2)[0] for part in decode.split(", ")]  # without "23.2 ms"
            assert shown == [f"{w} GPU{'s' if w > 1 else ''} {v}" for w, (_, v) in sorted(best.items())]


def test_plot_gives_seeds_of_one_configuration_one_colour_and_one_legend_entry(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from suite.report import plots

    records = [seeded("base", 1, [[10, 2.0, 1.0, 1e15], [20, 1.5, 2.0, 2e15]], baseline=True),
               seeded("base_seed2", 2, [[10, 1.9, 1.1, 1e15], [20, 1.6, 2.1, 2e15]]),
               seeded("fast", 1, [[10, 1.6, 0.5, 5e14], [20, 1.3, 1.0, 1e15]], lr=2e-3)]
    drawn = {}
    monkeypatch.setattr(plt, "close", lambda fig: drawn.setdefault("fig", fig))
    assert plots.draw(tmp_path / "p.png", "t", records, 1.55)
    ax = drawn["fig"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "base (baseline, 2 seeds)", "fast", "target 1.5500"]
    curves = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [line.get_color() for line in curves] == ["black", "black", "C0"]


def test_report_target_loss_flag_sets_the_equal_quality_target(tmp_path):
    curves = write_jsonl(tmp_path / "curves.jsonl", with_curves(read_jsonl(GPU)))
    out = tmp_path / "report.md"
    proc = run_cli("report", curves, "--target-loss", "9.5", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "### Cost to reach validation loss 9.5000" in out.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- committed reports

REPORTS = sorted(p for p in (ROOT / "reports").glob("*.md") if "Rendered by: `" in p.read_text())


def test_every_committed_report_with_records_names_its_command():
    records = {p.stem for p in (ROOT / "reports" / "records").glob("*.jsonl")}
    named = {p.stem for p in REPORTS}
    assert {p.stem for p in (ROOT / "reports").glob("*.md")} & records <= named


@pytest.mark.parametrize("report", REPORTS, ids=lambda p: p.name)
def test_committed_report_renders_again_identically(report, tmp_path, monkeypatch):
    """Each committed report, rendered again from its committed records by the command it names, is
    byte for byte the same (the plots go to a scratch folder, not over the committed PNGs)."""
    from suite.cli import main

    text = report.read_text()
    if "![" in text:
        pytest.importorskip("matplotlib")
    command = shlex.split(re.search(r"^Rendered by: `(.+)`$", text, re.M).group(1))
    assert command[:4] == ["python", "-m", "suite", "report"]
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "records").symlink_to(ROOT / "reports" / "records")
    monkeypatch.chdir(tmp_path)
    assert main(command[3:]) == 0
    rendered = (tmp_path / command[command.index("-o") + 1]).read_text()
    assert rendered == text, "".join(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True)))


# ---------------------------------------------------------------------------------------------- schema 2

V2 = DATA / "v2_cpu.jsonl"  # real CPU records: training, V-cycle, random-LTD, CQIL accuracy, inference


def test_v2_report_markdown_golden():
    proc = run_cli("report", V2)
    assert proc.returncode == 0, proc.stderr
    check_golden("report_v2.md", proc.stdout)


def test_variable_shape_runs_get_one_row_per_schedule_position():
    from suite.report.measures import positions_section
    from suite.records import read_records

    recs = {r["scenario"]: r for r in read_records(V2)}
    recs = {"vcycle": recs["multilevel_vcycle"], "dp": recs["random_ltd_layouts"], "tiny": recs["tiny"]}
    text = "\n".join(positions_section([recs["vcycle"]]))
    times = {tuple(m["point"].values()): m for m in recs["vcycle"]["measures"] if m["name"] == "step_time"}
    assert set(times) == {(0, "4x64"), (1, "2x32"), (2, "4x64")}  # never one pooled measure
    assert f"| vcycle | step_time | phase=1 shape=2x32 | {times[(1, '2x32')]['value'] * 1e3:.1f} ms |" in text
    ltd = {m["point"]["kept"] for m in recs["dp"]["measures"] if m["name"] == "step_time" and m["point"]}
    assert len(ltd) > 1
    assert positions_section([recs["tiny"]]) == []  # fixed shape: nothing per position
    out = run_cli("report", V2).stdout
    assert "| vcycle (baseline) | tp1 pp1 dp1 | 1 |" in out and " ‡ |" in table_line(out, "vcycle (baseline)")
    assert " ‡ |" not in table_line(out, "dp (baseline)")  # the first dp: the fixed-shape tiny run


def test_accuracy_without_a_plug_in_gets_the_generic_table(tmp_path):
    """A plain checkpoint evaluation (no CQIL plan): the core table, one row per model block."""
    rec = next(json.loads(line) for line in V2.read_text().splitlines() if '"kind": "accuracy"' in line)
    rec["config"]["parallel"]["cqil"] = None
    rec["metrics"]["cqil"] = None
    for key in ("concurrent", "finetuned", "finetune"):
        rec["metrics"]["accuracy"].pop(key)
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    out = run_cli("report", path).stdout
    original = rec["metrics"]["accuracy"]["original"]
    assert "| variant | model | ppl | bits/byte | Δ ppl | KL |" in out and "CQIL" not in out
    assert f"| cqil2 | original | {original['perplexity']:.2f} | {original['bpb']:.4f} | — | — |" in out


@pytest.mark.parametrize("output", ["folder", "file/report.md"])
def test_report_output_that_cannot_be_a_file_exits_2(tmp_path, output):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    proc = run_cli("report", GPU, "-o", tmp_path / output)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "Fix:" in proc.stderr and str(tmp_path / output) in proc.stderr


def test_not_ok_rows_name_their_status(tmp_path):
    """A diverged (or interrupted, skipped) variant says so, not 'failed'."""
    rec = json.loads((ROOT / GPU).read_text().splitlines()[1])
    rec.update(status="diverged", error={"type": "NonFiniteLoss", "message": "loss nan at step 12", "step": 12})
    path = tmp_path / "records.jsonl"
    path.write_text((ROOT / GPU).read_text().splitlines()[0] + "\n" + json.dumps(rec) + "\n")
    out = run_cli("report", path).stdout
    assert f"| {rec['variant']} | " in out and "**diverged: NonFiniteLoss: loss nan at step 12**" in out


def test_plot_skips_curve_points_whose_loss_was_not_finite():
    from suite.report.plots import curve

    rec = {"metrics": {"validation_curve": [[10, 3.0, 1.0, 100], [20, None, 2.0, 200], [30, 2.5, 3.0, 300]]}}
    assert curve(rec) == [[10, 3.0, 1.0, 100, 0], [30, 2.5, 3.0, 300, 0]]


def test_a_baseline_on_synthetic_tokens_sets_no_default_target():
    """Uniform random tokens carry no quality, so their final loss is no target; an asked target still is."""
    from suite.report.quality import quality_rows

    base = seeded("base", 1, [[10, 2.0, 3.0, 100], [20, 1.5, 5.0, 200]], baseline=True)
    other = seeded("other", 1, [[10, 1.5, 2.5, 50], [20, 1.4, 4.0, 100]], lr=2e-3)
    assert quality_rows([base, other])[0] == base["metrics"]["validation_loss"]  # real text: its final loss
    base["config"]["data"] = {"source": "synthetic"}
    assert quality_rows([base, other]) == (None, [])
    target, rows = quality_rows([base, other], asked=1.5)
    assert target == 1.5 and [r["reached"] for r in rows] == [True, True]


def test_scaling_column_when_gpu_counts_differ():
    """The 1B model on one and two H200s (reports/records/gpt1b_parallel_h200x2.jsonl): scaling is each
    variant's tokens/s per GPU over the one-GPU baseline's, recomputed here from the records' metrics; a
    table whose variants all use one GPU count has no scaling column."""
    from suite.report.render import markdown

    records = ROOT / "reports" / "records" / "gpt1b_parallel_h200x2.jsonl"
    latest = load_latest([records])
    recs = {v: r for (_, v), r in latest.items()}
    base = recs["single"]["metrics"]["tokens_per_s"] / recs["single"]["world_size"]
    lines = markdown(latest, [records]).splitlines()
    header = next(line for line in lines if line.startswith("| variant |"))
    col = [c.strip() for c in header.strip("|").split("|")].index("scaling")
    for variant, rec in recs.items():
        expected = rec["metrics"]["tokens_per_s"] / rec["world_size"] / base
        row = next(line for line in lines if line.startswith(f"| {variant} "))
        assert row.strip("|").split("|")[col].strip() == f"{100 * expected:.1f}%"
    one_count = {k: r for k, r in latest.items() if r["world_size"] == 2}
    assert "| scaling |" not in markdown(one_count, [records])
