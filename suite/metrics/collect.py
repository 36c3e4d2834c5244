"""Per-variant metrics that need every rank (peak memory, energy) and the machine's ceilings."""
from __future__ import annotations

import resource

import torch
import torch.distributed as dist

from suite.metrics import hardware
from suite.workloads.measures import training_measures


def peak_memory() -> tuple[int, str]:
    """This rank's peak: device allocation on GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"  # Linux: KiB


def reduce_scalar(value: float | None, op, ctx) -> float | None:
    """All-reduce a per-rank scalar; None anywhere gives None."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.tensor([0.0 if value is None else float(value), 1.0 if value is None else 0.0],
                     dtype=torch.float64, device=device)
    dist.all_reduce(t[:1], op=op)
    missing = t[1:].clone()
    dist.all_reduce(missing, op=dist.ReduceOp.MAX)
    return None if missing.item() else t[0].item()


def training_metrics(r: dict, v, ctx) -> dict:
    """Per-variant metrics (schema in suite.records) from this rank's raw results."""
    cuda = torch.cuda.is_available()
    peak, kind = peak_memory()
    peak = reduce_scalar(peak, dist.ReduceOp.MAX, ctx)
    energy = reduce_scalar(r["energy_j"], dist.ReduceOp.SUM, ctx)
    # Rank 0's clock is the step clock: every step ends with collectives that include it.
    summary = r["summary"]
    median = summary["median"]
    w = v.workload
    # all work over all time of the timed steps: right also when a technique varies FLOPs per step
    tflops = sum(r["timed_step_flops"]) / sum(r["times"]) / ctx.world / 1e12
    device_name = torch.cuda.get_device_name() if cuda else None
    peak_tflops = hardware.datasheet_peak_tflops(device_name)
    ceilings = hardware.measured_ceilings() if cuda else {}
    gemm = ceilings.get("gemm_tflops")
    timed_s = sum(r["times"])
    losses = r["loss_values"]
    tail = losses[-min(5, len(losses)):]
    out = {
        "parameters": r["parameters"], "steps": r["steps"], "timed_steps": len(r["times"]),
        "tokens": r["tokens"], "step_time_s": summary, "walltime_s": r["walltime_s"],
        "tokens_per_s": w.global_batch * w.seq_length / median,
        "flops_per_step": r["flops_per_step"], "flops_total": r["flops_total"],
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "gemm_ceiling_tflops": gemm, "fraction_of_gemm_ceiling": tflops / gemm if gemm else None,
        "copy_bandwidth_tb_s": ceilings.get("copy_tb_s"),
        "peak_memory_bytes": int(peak), "memory_kind": kind,
        "loss_curve": [[i + 1, x] for i, x in enumerate(losses)],
        "final_loss": sum(tail) / len(tail),
        "validation_loss": r["validation"], "validation_curve": r["validation_curve"],
        "energy_j": energy, "avg_power_w": energy / timed_s if energy is not None and timed_s else None,
        "heldout": r.get("heldout"), "target": r["target"], "extra": r["extra"],
    }
    heldout = dict(r["heldout"]) if r.get("heldout") else None  # its per-window losses go to the measures
    out["heldout"] = heldout
    windows = heldout.pop("window_losses", None) if heldout else None
    out["measures"] = training_measures(out, r["times"], r.get("step_points"), r.get("validation_samples"), windows)
    return out
