"""The metrics the built-in workloads declare, and the record ``measures`` they write.

Torch-free on purpose: the workloads (which need torch) build their measures with these functions, and
the record reader (which must not) derives the same measures from the summary fields of schema-1
records, which kept no raw samples. One declaration serves both, so a v1 record and a v2 record of the
same run describe their numbers identically, apart from the samples.

    training   step_time per timed step (one measure per schedule position when a technique changes the
               step's shape), validation_loss per held-out batch, heldout_loss (held-out text, whole),
               peak_memory, energy; tokens_per_s, tflops_per_gpu, mfu and walltime as information
    inference  ttft per timed request and decode_latency per timed decode step, per (batch, prompt, gen,
               graph) point; peak_memory
    accuracy   heldout_loss and perplexity per model (point ``model``: original, concurrent, finetuned),
               acc and acc_norm per (task, model) with per-example correctness as samples
"""
from __future__ import annotations

from suite.metrics.declare import Metric, declare, measure, median

STEP_TIME = declare(Metric("step_time", "s", "time", "lower", "median",
                           doc="one optimizer step after warm-up (CUDA events on GPU)"))
VALIDATION_LOSS = declare(Metric("validation_loss", "nats/token", "quality", "lower", "mean", paired=True,
                                 doc="final validation loss; samples: one per held-out batch, same batches "
                                     "for every run of one data configuration"))
HELDOUT_LOSS = declare(Metric("heldout_loss", "nats/token", "quality", "lower", "mean", paired=True,
                              doc="held-out text loss of the final model (rolling windows)"))
PERPLEXITY = declare(Metric("perplexity", "", "quality", "lower", "info", doc="exp(heldout_loss)"))
BITS_PER_BYTE = declare(Metric("bits_per_byte", "bits/byte", "quality", "lower", "info",
                               doc="held-out loss per UTF-8 byte of the scored text"))
FINAL_LOSS = declare(Metric("final_loss", "nats/token", "quality", "lower", "info",
                            doc="mean training loss of the last steps"))
PEAK_MEMORY = declare(Metric("peak_memory", "bytes", "memory", "lower", "tolerance", tolerance=0.05,
                             doc="max over ranks of the peak device allocation (CPU: peak RSS)"))
ENERGY = declare(Metric("energy", "J", "energy", "lower", "tolerance", tolerance=0.10,
                        doc="NVML energy of the timed steps, summed over GPUs"))
TOKENS_PER_S = declare(Metric("tokens_per_s", "tokens/s", "rate", "higher", "info",
                              doc="global tokens per second at the median step time (follows from step_time)"))
TFLOPS_PER_GPU = declare(Metric("tflops_per_gpu", "TFLOP/s", "rate", "higher", "info",
                                doc="model FLOPs of the timed steps over their time, per GPU"))
MFU = declare(Metric("mfu", "fraction", "rate", "higher", "info", doc="tflops_per_gpu / datasheet peak"))
WALLTIME = declare(Metric("walltime", "s", "time", "lower", "info",
                          doc="sum of all step times, warm-up included, validation excluded"))
TTFT = declare(Metric("ttft", "ms", "time", "lower", "median",
                      doc="time to first token (prefill + first greedy token) per timed request"))
DECODE_LATENCY = declare(Metric("decode_latency", "ms/token", "time", "lower", "median",
                                doc="one decode step (one new token per sequence), per timed step"))
ACC = declare(Metric("acc", "fraction", "quality", "higher", "mean", paired=True,
                     doc="zero-shot multiple choice: the most likely choice is the label (per example 1 or 0)"))
ACC_NORM = declare(Metric("acc_norm", "fraction", "quality", "higher", "mean", paired=True,
                          doc="as acc, log-likelihood per character of the choice"))
KL_TO_ORIGINAL = declare(Metric("kl_to_original", "nats/token", "quality", "lower", "info",
                                doc="per-token KL(original ‖ modified model) on held-out windows"))


def _get(d, *keys):
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _summary_measure(metric: Metric, summary: dict | None, scale: float = 1.0, **point) -> dict | None:
    """A compare='median' measure from a v1 order-statistics summary (no samples): the median is its
    value and ``summary`` keeps what a summary-based method needs (n, p10, p90, ...)."""
    if not isinstance(summary, dict) or summary.get("median") is None:
        return None
    m = measure(metric, summary["median"] * scale, **point)
    m["summary"] = {k: (v * scale if k != "n" and v is not None else v) for k, v in summary.items()}
    return m


def heldout_measures(block: dict | None, samples=None, **point) -> list[dict]:
    """heldout_loss (with per-window losses when given), perplexity and bits per byte of one held-out block."""
    if not isinstance(block, dict) or block.get("loss") is None:
        return []
    out = [measure(HELDOUT_LOSS, block["loss"], samples, **point)]
    if block.get("perplexity") is not None:
        out.append(measure(PERPLEXITY, block["perplexity"], **point))
    if block.get("bpb") is not None:
        out.append(measure(BITS_PER_BYTE, block["bpb"], **point))
    return out


def training_measures(m: dict, times: list[float] | None = None, step_points: list[dict] | None = None,
                      validation_samples: list[float] | None = None,
                      heldout_samples: list[float] | None = None) -> list[dict]:
    """The measures of a training record from its ``metrics`` summary ``m`` and, when measured, the raw
    timed step times with the schedule position of each step (``step_points``, {} for a fixed shape),
    the per-batch validation losses and the per-window held-out losses."""
    out = []
    if times:
        points = step_points or [{}] * len(times)
        groups: dict[tuple, list[float]] = {}
        for t, point in zip(times, points):
            groups.setdefault(tuple(sorted(point.items())), []).append(t)
        for key, samples in groups.items():  # one measure per schedule position, never one pooled spread
            out.append(measure(STEP_TIME, median(samples), samples, **dict(key)))
    elif m.get("step_time_s") is not None:
        out.append(_summary_measure(STEP_TIME, m["step_time_s"]))
    if m.get("validation_loss") is not None or validation_samples:
        out.append(measure(VALIDATION_LOSS, m.get("validation_loss"), validation_samples))
    out += heldout_measures(m.get("heldout"), heldout_samples)
    for metric, key in ((FINAL_LOSS, "final_loss"), (PEAK_MEMORY, "peak_memory_bytes"), (ENERGY, "energy_j"),
                        (TOKENS_PER_S, "tokens_per_s"), (TFLOPS_PER_GPU, "tflops_per_gpu"), (MFU, "mfu"),
                        (WALLTIME, "walltime_s")):
        if m.get(key) is not None:
            out.append(measure(metric, m[key]))
    return [x for x in out if x is not None]


def _graph(entry: dict) -> str:
    return "on" if entry.get("cuda_graph") else "off"


def inference_measures(m: dict, samples: dict | None = None) -> list[dict]:
    """TTFT and decode latency per (batch, prompt, gen, graph) point of ``m["inference"]``; ``samples``
    maps (batch, prompt, gen, cuda_graph) to {"ttft": [ms...], "decode": [ms...]} when measured."""
    out = []
    for e in m.get("inference") or []:
        point = {"batch": e["batch"], "prompt": e["prompt"], "gen": e["gen"], "graph": _graph(e)}
        raw = (samples or {}).get((e["batch"], e["prompt"], e["gen"], bool(e.get("cuda_graph"))))
        for metric, phase, key in ((TTFT, "prefill", "ttft"), (DECODE_LATENCY, "decode", "decode")):
            if raw:
                if raw.get(key):
                    out.append(measure(metric, median(raw[key]), raw[key], **point))
                continue
            summary = {k: e.get(f"{phase}_ms_{k}") for k in ("median", "p10", "p90", "p99")}
            summary["n"] = e.get("repeats") if phase == "prefill" else e.get("decode_steps")
            out.append(_summary_measure(metric, summary, **point))
    if m.get("peak_memory_bytes") is not None:
        out.append(measure(PEAK_MEMORY, m["peak_memory_bytes"]))
    return [x for x in out if x is not None]


def accuracy_measures(m: dict, samples: dict | None = None) -> list[dict]:
    """Per model block of ``m["accuracy"]``: held-out quality and per-task acc / acc_norm. ``samples``:
    {model: {"heldout": [per-window losses], "tasks": {task: {"acc": [1, 0, ...], "acc_norm": [...]}}}}."""
    out = []
    for model, block in (m.get("accuracy") or {}).items():
        if model in ("finetune", "walltime_s") or not isinstance(block, dict):
            continue
        raw = (samples or {}).get(model) or {}
        out += heldout_measures(block, raw.get("heldout"), model=model)
        if isinstance(block.get("text"), dict):  # [eval] text: a file scored beside the held-out tail
            out += heldout_measures(block["text"], raw.get("text"), model=model, text=block["text"].get("path"))
        if block.get("kl_to_original") is not None:
            out.append(measure(KL_TO_ORIGINAL, block["kl_to_original"], model=model))
        for task, t in (block.get("tasks") or {}).items():
            for metric in (ACC, ACC_NORM):
                if not isinstance(t, dict) or t.get(metric.name) is None:
                    continue
                per_example = _get(raw, "tasks", task, metric.name)
                x = measure(metric, t[metric.name], per_example, task=task, model=model)
                if per_example is None:  # v1: the standard error and count it kept
                    x["summary"] = {"stderr": t.get(f"{metric.name}_stderr"), "n": t.get("n")}
                out.append(x)
    if m.get("peak_memory_bytes") is not None:
        out.append(measure(PEAK_MEMORY, m["peak_memory_bytes"]))
    return out


def derive_v1(rec: dict) -> list[dict]:
    """The measures a schema-1 record's summary fields support (no raw samples were kept)."""
    m = rec.get("metrics")
    if not isinstance(m, dict) or rec.get("status") != "ok":
        return []
    kind = _get(rec, "config", "workload", "kind")
    if kind == "inference" or "inference" in m:
        return inference_measures(m)
    if kind == "accuracy" or "accuracy" in m:
        return accuracy_measures(m)
    return training_measures(m)

