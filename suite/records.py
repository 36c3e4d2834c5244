"""Result records: one JSON object per variant run, appended to ``<results dir>/records.jsonl``.

Schema version 2 (``"schema": 2``); strict JSON (no NaN or Infinity: see "Non-finite numbers" below).
``null`` wherever a value could not be measured. Keys:

    schema            2
    status            "ok" | "failed" (an exception, a hung or killed rank, a broken process group) |
                      "diverged" (the loss went non-finite: error.step says where; metrics up to there are
                      kept) | "interrupted" (Ctrl-C, SIGTERM) | "skipped" (could not run on this launch or
                      machine: error.message says why; env is null)
    scenario          scenario name;  scenario_file: path as given;  variant: variant name
    is_baseline       true for the variant reports compare against
    config_hash       sha256 of the fully resolved variant (first 16 hex digits)
    config            the fully resolved variant (model, parallel, workload, data, eval, report, tricks)
    started_at, finished_at   ISO-8601 UTC
    command           the command line that produced the record
    world_size, tp, pp, dp    processes, and the layout megatron-core's parallel_state was given
    layout            what actually ran: {"world_size", "tp", "pp", "dp", ...}; plug-ins add their keys
                      (a parallel mode adds "<mode>_degree"). Readers take a parallel mode from here, never from dp.
    error             not ok: {"type", "message", "traceback", "rank"} (rank: the first failing rank, null
                      when no one rank is the cause); + "signal" (e.g. "SIGKILL", "SIGINT") when a signal
                      ended it, + "step" when diverged. Types the runner itself writes: "Skipped",
                      "Diverged", "Interrupted", "Hang", "RankKilled", "ProcessExit"; else the exception's
                      class name (suite.launch.spmd, suite.launch.guard, suite.launch.launcher)
    measures          self-describing measurements (``suite.metrics.declare``), each with its raw samples:
                      {"name", "unit", "kind", "direction", "compare", "point", "value", "samples",
                       "tolerance" (compare = tolerance), "paired" (compare = mean, same windows/examples),
                       "reason" (why value or samples are null), "summary" (records read from schema 1:
                       the order statistics or standard error the value came from, there are no samples)}.
                      The built-in workloads' measures: ``suite.workloads.measures``; plug-ins add theirs
                      (one step_time measure per schedule position of a variable-shape run)
    metrics           the flat summary tables read (successes; diverged runs: up to the divergence):
        parameters                total parameter count
        steps, timed_steps        optimizer steps run, and those timed (after warm-up)
        tokens                    training tokens consumed (all steps)
        step_time_s               {"median", "p10", "p90", "p99", "min", "max", "mean", "n"} over timed steps
        tokens_per_s              global tokens per second at the median step time
        flops_per_step            analytic model FLOPs of the last step (suite.metrics.flops; a technique
                                  may change it from step to step: flops_total is the sum)
        flops_total               analytic model FLOPs of all steps run
        tflops_per_gpu            Σ FLOPs of the timed steps / Σ their times / world size / 1e12
        mfu                       tflops_per_gpu / datasheet dense bf16 peak (null: unknown device)
        gemm_ceiling_tflops       measured bf16 GEMM rate of this GPU (null on CPU)
        fraction_of_gemm_ceiling  tflops_per_gpu / gemm_ceiling_tflops
        copy_bandwidth_tb_s       measured device copy bandwidth, read + write (null on CPU)
        peak_memory_bytes         max over ranks of the device's peak allocation (CPU: peak RSS)
        memory_kind               "cuda_max_allocated" | "cpu_max_rss"
        loss_curve                [[step, loss], ...] training loss (mean over the global batch)
        final_loss                mean training loss of the last min(5, steps) steps
        validation_loss           held-out loss at the end (null if eval.validation is false)
        validation_curve          [[step, loss, training walltime so far (s), FLOPs so far], ...]
        walltime_s                sum of all step times (warm-up included, validation excluded)
        warmup_walltime_s         sum of the first workload.warmup_steps step times (start-up: compilation,
                                  allocator growth); walltimes "without start-up" subtract it (training
                                  records written since it was added; absent from older ones)
        compile                   kernels = "compile": {"graphs", "graph_breaks"} dynamo made on rank 0 (a break
                                  splits a layer into pieces run from Python: host time); null otherwise
        energy_j, avg_power_w     NVML energy over the timed steps, summed over GPUs (null without NVML)
        heldout                   held-out text metrics of the final model (eval.heldout_text, text and
                                  jsonl corpora; null otherwise; suite.eval.metrics.heldout_text):
                                  {"loss" (nats/token), "perplexity" (exp(loss)), "bpb" (bits per UTF-8
                                  byte), "tokens" (scored), "bytes" (their UTF-8 bytes), "seq_length"}
        target                    when workload.target_loss is set: {"target_loss", "reached", "steps",
                                  "tokens", "flops", "walltime_s" (training walltime to it, warm-up included)}
        inference                 inference workload: one entry per latency point (suite.workloads.inference)
        accuracy                  accuracy workload: one block per model (suite.workloads.accuracy)
        extra                     technique-specific measurements, keyed by technique name
    env               {"gpu_name", "gpu_count", "driver", "cuda", "torch", "megatron_core", "nccl", "python",
                      "cpu", "processes", "hostname", "boot_id", "git_commit", "variables"} (suite.metrics.env;
                      null when the variant never started); variables: the set environment variables that
                      change kernels, tuning, memory or communication ({name: value}; TORCHINDUCTOR_*,
                      PYTORCH_*, NCCL_*, ...), absent in records from before it was kept
    upgraded_from     1 on records read from schema 1 (added on read, never written)
    non_finite        only when some value was NaN or infinite: {"metrics.final_loss": "non-finite: nan"}

Writing. Workloads return ``measures`` and extra ``layout`` keys inside their metrics dict;
``append_record`` lifts both to the top level, completes ``layout`` from world_size/tp/pp/dp and
replaces every non-finite number by null with a reason (``non_finite``; a measure's own ``reason``),
so a diverged run's record is still written. Records are only ever appended, one ``write`` of one
line under an exclusive lock, then fsync: a crash never leaves half a record and nothing written is
ever rewritten.

Reading. ``read_records`` checks every line (a JSON object, a known schema, the type of every field
the reporter reads: ``check_record``) and fails with the file, line, key and fix otherwise. Schema-1
records are upgraded to the schema-2 view on read (``upgrade_v1``): ``layout`` from tp/pp/dp (and
plug-ins' v1 fields), ``measures`` derived from the summary fields, without samples, and
``"upgraded_from": 1``.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import os
from pathlib import Path

from suite import RECORD_SCHEMA_VERSION
from suite.errors import UserError

RECORDS_FILE = "records.jsonl"
READABLE_SCHEMAS = (1, 2)
LAYOUT_KEYS = ("world_size", "tp", "pp", "dp")


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def records_path(results: str | Path) -> Path:
    results = Path(results)
    return results if results.suffix == ".jsonl" else results / RECORDS_FILE


# --------------------------------------------------------------------------------------------- writing


def _finite_only(value, path: str, reasons: dict):
    """``value`` with every non-finite float replaced by None, noting each one's path in ``reasons``."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        reasons[path] = f"non-finite: {value}"
        return None
    if isinstance(value, dict):
        return {k: _finite_only(v, f"{path}.{k}" if path else str(k), reasons) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(v, f"{path}[{i}]", reasons) for i, v in enumerate(value)]
    return value


def layout_of(record: dict, extra: dict | None = None) -> dict:
    """world_size/tp/pp/dp of the record, then the keys a workload or plug-in added."""
    return {**{k: record.get(k) for k in LAYOUT_KEYS}, **(extra or {})}


def prepare(record: dict) -> dict:
    """The schema-2 record ``append_record`` writes: measures and layout lifted out of the metrics,
    layout completed, non-finite numbers replaced by null with their reasons."""
    record = {"schema": RECORD_SCHEMA_VERSION, **record}
    metrics = record.get("metrics")
    extra_layout, measures = {}, record.get("measures") or []
    if isinstance(metrics, dict):
        metrics = dict(metrics)
        measures = list(measures) + list(metrics.pop("measures", None) or [])
        extra_layout = metrics.pop("layout", None) or {}
        record["metrics"] = metrics
    record["layout"] = layout_of(record, {**(record.get("layout") or {}), **extra_layout})
    record["measures"] = measures
    reasons: dict[str, str] = {}
    record = _finite_only(record, "", reasons)
    for i, m in enumerate(record["measures"]):  # a measure says itself why its value is missing
        reason = reasons.get(f"measures[{i}].value")
        if isinstance(m, dict) and reason and not m.get("reason"):
            m["reason"] = reason
    if reasons:
        record["non_finite"] = {**(record.get("non_finite") or {}), **reasons}
    return record


def append_record(results: str | Path, record: dict) -> Path:
    record = prepare(record)
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


# --------------------------------------------------------------------------------------------- checking

# Type specs of the fields readers use. null is allowed (not measured) and so is a missing key, except
# where the type ends in "!": wherever its parent object is present, the key must hold a value.
# "[]" in a path: every element of that list; "*": every value of that object. Plug-ins add the fields of their own blocks.
NUM, INT, STR, BOOL, DICT, LIST = "number", "integer", "string", "boolean", "object", "list"
REQUIRED = ("scenario", "variant", "status")
FIELDS: dict[str, str] = {
    "scenario": STR, "variant": STR, "status": STR, "is_baseline": BOOL, "config_hash": STR,
    "scenario_file": STR, "command": STR, "started_at": STR, "finished_at": STR,
    "config": DICT, "config.model": DICT, "config.model.num_layers": INT, "config.parallel": DICT,
    "config.workload": DICT, "config.workload.kind": STR, "config.workload.seed": INT,
    "env": DICT, **{f"env.{k}": STR for k in ("gpu_name", "torch", "megatron_core", "git_commit", "driver", "cuda",
                                               "nccl", "python", "hostname", "boot_id", "cpu")},
    "env.gpu_count": INT, "env.processes": INT, "env.variables": DICT, "env.variables.*": STR,
    "error": DICT, "error.type": STR, "error.message": STR,
    "world_size": INT, "tp": INT, "pp": INT, "dp": INT, "layout": DICT,
    "measures": LIST, "measures[]": DICT + "!", "measures[].name": STR + "!", "measures[].unit": STR,
    "measures[].kind": STR,
    "measures[].direction": STR, "measures[].compare": STR, "measures[].point": DICT, "measures[].value": NUM,
    "measures[].samples": LIST, "measures[].samples[]": NUM, "measures[].tolerance": NUM,
    "metrics": DICT, "metrics.parameters": NUM, "metrics.steps": INT, "metrics.timed_steps": INT,
    "metrics.tokens": NUM, "metrics.step_time_s": DICT,
    **{f"metrics.step_time_s.{k}": NUM for k in ("median", "p10", "p90", "p99", "min", "max", "mean", "n")},
    **{f"metrics.{k}": NUM for k in ("tokens_per_s", "flops_per_step", "flops_total", "tflops_per_gpu", "mfu",
                                     "gemm_ceiling_tflops", "fraction_of_gemm_ceiling", "peak_memory_bytes",
                                     "final_loss", "validation_loss", "walltime_s", "energy_j", "avg_power_w")},
    "metrics.memory_kind": STR, "metrics.loss_curve": LIST, "metrics.loss_curve[]": LIST + "!",
    "metrics.loss_curve[][]": NUM, "metrics.validation_curve": LIST, "metrics.validation_curve[]": LIST + "!",
    "metrics.validation_curve[][]": NUM, "metrics.heldout": DICT,
    **{f"metrics.heldout.{k}": NUM for k in ("loss", "perplexity", "bpb", "tokens", "bytes", "seq_length")},
    "metrics.target": DICT, "metrics.target.target_loss": NUM, "metrics.target.reached": BOOL,
    "metrics.target.steps": NUM, "metrics.target.tokens": NUM, "metrics.target.flops": NUM,
    "metrics.target.walltime_s": NUM, "metrics.extra": DICT,
    "metrics.prompt_source": STR,
    "metrics.inference": LIST, "metrics.inference[]": DICT + "!", "metrics.inference[].batch": INT + "!",
    "metrics.inference[].prompt": INT + "!", "metrics.inference[].gen": INT + "!",
    "metrics.inference[].cuda_graph": BOOL,
    "metrics.inference[].repeats": INT, "metrics.inference[].repeats_same_tokens": BOOL,
    "metrics.inference[].same_tokens_as_eager": BOOL, "metrics.inference[].tokens_differ_from": INT,
    "metrics.inference[].repeats_differ_from": INT, "metrics.inference[].distinct_4grams": NUM,
    **{f"metrics.inference[].{phase}_ms_{k}": NUM for phase in ("prefill", "decode")
       for k in ("median", "p10", "p90", "p99")},
    **{f"metrics.inference[].{k}": NUM for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_mfu",
                                                 "decode_bandwidth_fraction", "graph_logits_rel_diff",
                                                 "graph_noise_rel_diff", "decode_steps")},
    "metrics.accuracy": DICT,
    **{f"metrics.accuracy.{model}": DICT for model in ("original", "concurrent", "finetuned", "finetune")},
    **{f"metrics.accuracy.{model}.{k}": NUM for model in ("original", "concurrent", "finetuned")
       for k in ("loss", "perplexity", "bpb", "tokens", "bytes", "seq_length", "kl_to_original")},
    **{f"metrics.accuracy.{model}.tasks": DICT for model in ("original", "concurrent", "finetuned")},
    **{f"metrics.accuracy.{model}.tasks.*": DICT for model in ("original", "concurrent", "finetuned")},
    **{f"metrics.accuracy.{model}.tasks.*.{k}": NUM for model in ("original", "concurrent", "finetuned")
       for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")},
    **{f"metrics.accuracy.{model}.text": DICT for model in ("original", "concurrent", "finetuned")},
    **{f"metrics.accuracy.{model}.text.{k}": NUM for model in ("original", "concurrent", "finetuned")
       for k in ("loss", "perplexity", "bpb")},
    **{f"metrics.accuracy.{model}.text.path": STR for model in ("original", "concurrent", "finetuned")},
    **{f"metrics.accuracy.{model}.perplexity": NUM + "!" for model in ("original", "concurrent", "finetuned")},
    **{f"metrics.accuracy.original.{k}": NUM + "!" for k in ("tokens", "seq_length")},
}
_CHECKS = {NUM: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
           INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
           STR: lambda v: isinstance(v, str), BOOL: lambda v: isinstance(v, bool),
           DICT: lambda v: isinstance(v, dict), LIST: lambda v: isinstance(v, list)}


def _tokens(path: str) -> list[str]:
    """"metrics.loss_curve[][]" -> ["metrics", "loss_curve", "[]", "[]"]."""
    out = []
    for part in path.split("."):
        name = part.replace("[]", "")
        out += ([name] if name else []) + ["[]"] * part.count("[]")
    return out


def _at(value, tokens: list[str], where: str = ""):
    """(concrete path, value) of every value at ``tokens`` under ``value`` ("[]": each list element)."""
    if not tokens:
        yield where, value
        return
    head, rest = tokens[0], tokens[1:]
    if head == "[]":
        if isinstance(value, list):
            for i, item in enumerate(value):
                yield from _at(item, rest, f"{where}[{i}]")
    elif head == "*":
        if isinstance(value, dict):
            for key, item in value.items():
                yield from _at(item, rest, f"{where}.{key}")
    elif isinstance(value, dict) and head in value:
        yield from _at(value[head], rest, f"{where}.{head}" if where else head)


def _n(word: str) -> str:
    return "n" if word[0] in "aeiou" else ""


def check_record(rec, fields: dict[str, str] | None = None) -> str | None:
    """None when ``rec`` is a record the readers can use, else what is wrong (key and found type)."""
    if not isinstance(rec, dict):
        found = ("an array" if isinstance(rec, list) else "null" if rec is None else "a text" if isinstance(rec, str)
                 else "a boolean" if isinstance(rec, bool) else "a number")
        return f"is {found}, not a record object"
    for key in REQUIRED:
        if not isinstance(rec.get(key), str):
            return f"has no {key!r} text (every record names its scenario, variant and status)"
    for path, spec in {**FIELDS, **(fields or {})}.items():
        kind, tokens = spec.rstrip("!"), _tokens(path)
        if spec.endswith("!") and tokens[-1] != "[]":
            for where, parent in _at(rec, tokens[:-1]):
                if isinstance(parent, dict) and parent.get(tokens[-1]) is None:
                    return f"has no value at {where}.{tokens[-1]}; it must hold a{_n(kind)} {kind}"
        for where, value in _at(rec, tokens):
            if value is None:
                if spec.endswith("!") and tokens[-1] == "[]":  # a list of blocks has no null blocks
                    return f"has {where} = null; it must hold a{_n(kind)} {kind}"
                continue
            if not _CHECKS[kind](value):
                shown = json.dumps(value)[:40]
                return f"has {where} = {shown}, which is not a{_n(kind)} {kind}"
    return None


# --------------------------------------------------------------------------------------------- reading


def upgrade_v1(rec: dict) -> dict:
    """The schema-2 view of a schema-1 record: layout from tp/pp/dp (plug-ins add theirs), measures
    derived from the summary fields (no samples), the rest unchanged."""
    from suite.report.plugins import plugins
    from suite.workloads.measures import derive_v1

    out = copy.deepcopy(rec)
    out.update(schema=2, upgraded_from=1, layout=layout_of(rec), measures=derive_v1(rec))
    for plugin in plugins():
        if plugin.upgrade_v1:
            plugin.upgrade_v1(out)
    return out


def _plugin_fields() -> dict[str, str]:
    from suite.report.plugins import plugins

    return {path: kind for p in plugins() for path, kind in p.fields.items()}


def _lines(path: Path, given) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; binary and non-UTF-8 files are user errors."""
    if path.is_dir():
        raise UserError(f"{path} is a folder without {RECORDS_FILE}.", file=str(given),
                        fix="pass a results folder written by `suite run` or its records.jsonl.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read it ({e.strerror}).", file=str(path),
                        fix="check the path and its permissions.") from None
    if b"\x00" in data[:65536]:
        raise UserError("is a binary file, not records (JSON lines).", file=str(path),
                        fix=f"pass a {RECORDS_FILE} written by `suite run`, or its results folder.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"line {line} is not UTF-8 text (byte {data[e.start]:#04x}).", file=str(path),
                        fix="records are UTF-8 JSON lines: remove or repair that line.") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_records(*paths: str | Path) -> list[dict]:
    """Records from result folders or .jsonl files, in file order, all in the schema-2 view (schema-1
    records upgraded); a line that is not a usable record is a UserError naming file, line and fix."""
    out, fields = [], None
    for given in paths:
        path = records_path(given)
        if not path.exists():
            raise UserError(f"no results at {path}.", file=str(given),
                            fix="pass a results folder written by `suite run` or its records.jsonl.")
        for n, line in _lines(path, given):
            try:  # NaN / Infinity are not JSON: read as null, as the writer would have written them
                rec = json.loads(line, parse_constant=lambda _: None)
            except (json.JSONDecodeError, RecursionError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise UserError(f"line {n} is not JSON ({msg}).", file=str(path),
                                fix="remove or repair that line; records are one JSON object a line.") from None
            schema = rec.get("schema") if isinstance(rec, dict) else None
            if isinstance(rec, dict) and (isinstance(schema, bool) or schema not in READABLE_SCHEMAS):
                raise UserError(f"line {n} has record schema {schema!r}; this suite reads schemas "
                                f"{', '.join(map(str, READABLE_SCHEMAS))}.", file=str(path),
                                fix="re-run the scenario with this version of suite, or remove that line.")
            fields = _plugin_fields() if fields is None else fields
            problem = check_record(rec, fields)
            if problem:
                raise UserError(f"line {n} {problem}.", file=str(path),
                                fix="remove or repair that line; it is not a record `suite run` writes.")
            if schema == 1:
                rec = upgrade_v1(rec)
            else:
                rec.setdefault("layout", layout_of(rec))
                rec.setdefault("measures", [])
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
