"""Result records: one JSON object per variant run, appended to ``<results dir>/records.jsonl``.

Schema version 1 (``"schema": 1``). Keys (``null`` where a value could not be measured):

    schema            1
    status            "ok" | "failed"
    scenario          scenario name;  scenario_file: path as given;  variant: variant name
    is_baseline       true for the variant reports compare against
    config_hash       sha256 of the fully resolved variant (first 16 hex digits)
    config            the fully resolved variant (model, parallel, workload, data, eval, report, tricks)
    started_at, finished_at   ISO-8601 UTC
    command           the command line that produced the record
    world_size, tp, pp, dp    the parallel layout actually run
    error             failures only: {"type", "message", "traceback"}
    metrics           successes only:
        parameters                total parameter count
        steps, timed_steps        optimizer steps run, and those timed (after warm-up)
        tokens                    training tokens consumed (all steps)
        step_time_s               {"median", "p10", "p90", "min", "max", "mean", "n"} over timed steps
        tokens_per_s              global tokens per second at the median step time
        flops_per_step            analytic model FLOPs of the last step (suite.metrics.flops; a technique
                                  may change it from step to step: flops_total is the sum)
        tflops_per_gpu            Σ FLOPs of the timed steps / Σ their times / world size / 1e12
        mfu                       tflops_per_gpu / datasheet dense bf16 peak (null: unknown device)
        gemm_ceiling_tflops       measured bf16 GEMM rate of this GPU (null on CPU)
        fraction_of_gemm_ceiling  tflops_per_gpu / gemm_ceiling_tflops
        peak_memory_bytes         max over ranks of the device's peak allocation (CPU: peak RSS)
        memory_kind               "cuda_max_allocated" | "cpu_max_rss"
        loss_curve                [[step, loss], ...] training loss (mean over the global batch)
        final_loss                mean training loss of the last min(5, steps) steps
        validation_loss           held-out loss at the end (null if eval.validation is false)
        validation_curve          [[step, loss, training walltime so far (s), FLOPs so far], ...]
        walltime_s                sum of all step times (warm-up included, validation excluded)
        energy_j, avg_power_w     NVML energy over the timed steps, summed over GPUs (null without NVML)
        heldout                   held-out text metrics of the final model (eval.heldout_text, text and
                                  jsonl corpora; null otherwise; suite.eval.metrics.heldout_text):
                                  {"loss" (nats/token), "perplexity" (exp(loss)), "bpb" (bits per UTF-8
                                  byte), "tokens" (scored), "bytes" (their UTF-8 bytes), "seq_length"}
        target                    time-to-quality block when workload.target_loss is set (tricks)
        extra                     technique-specific measurements, keyed by technique name
    env               GPU name and count, driver, CUDA, torch, megatron-core, NCCL, python, host,
                      git commit, hostname

Records are only ever appended, one ``write`` of one line under an exclusive lock, then fsync, so
a crash never leaves half a record and nothing written is ever rewritten.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from suite import RECORD_SCHEMA_VERSION
from suite.errors import UserError

RECORDS_FILE = "records.jsonl"


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def records_path(results: str | Path) -> Path:
    results = Path(results)
    return results if results.suffix == ".jsonl" else results / RECORDS_FILE


def append_record(results: str | Path, record: dict) -> Path:
    record = {"schema": RECORD_SCHEMA_VERSION, **record}
    path = records_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=False, allow_nan=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_records(*paths: str | Path) -> list[dict]:
    """Records from result folders or .jsonl files, in file order; bad lines are errors."""
    out = []
    for given in paths:
        path = records_path(given)
        if not path.exists():
            raise UserError(f"no results at {path}.", file=str(given),
                            fix="pass a results folder written by `suite run` or its records.jsonl.")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"line {n} is not JSON ({e.msg}).", file=str(path),
                                fix="remove or repair that line; records are one JSON object a line.") from None
            if rec.get("schema") != RECORD_SCHEMA_VERSION:
                raise UserError(f"line {n} has record schema {rec.get('schema')!r}; this suite reads "
                                f"schema {RECORD_SCHEMA_VERSION}.", file=str(path),
                                fix="re-run the scenario with this version of suite.")
            out.append(rec)
    return out


def completed(results: str | Path) -> set[tuple[str, str, str]]:
    """(scenario, variant, config_hash) of successful records: what --resume skips."""
    path = records_path(results)
    if not path.exists():
        return set()
    return {(r["scenario"], r["variant"], r["config_hash"]) for r in read_records(path)
            if r.get("status") == "ok"}


def latest_by_variant(records: list[dict]) -> dict[tuple[str, str], dict]:
    """The last record of each (scenario, variant): re-runs supersede, nothing is deleted."""
    out: dict[tuple[str, str], dict] = {}
    for r in records:
        out[(r["scenario"], r["variant"])] = r
    return out
