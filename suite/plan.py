"""`suite plan`: what each variant will cost, from the analytic model alone (no torch)."""
from __future__ import annotations

from suite import registry
from suite.metrics import flops
from suite.report import fmt  # torch-free: parameters are written as the report writes them
from suite.scenario import load_scenario


def plan_rows(variants) -> list[dict]:
    rows = []
    for v in variants:
        shape = flops.Shape.of(v.model)
        w = v.workload
        row = {"variant": v.name + (" (baseline)" if v.is_baseline else ""),
               "gpus": v.world_size(), "parameters": flops.parameters(shape)["total"]}
        if w.kind == "inference":
            row.update(_inference_row(v, shape))
        elif w.kind == "accuracy":  # forward passes over held-out text, and the fine-tune's steps
            row.update(layout="1 process", tokens_per_step=w.seq_length,
                       flops_per_step=flops.forward_flops(shape, 1, w.seq_length),
                       memory_per_gpu=flops.parameters(shape)["total"] * (2 if w.bf16 else 4))
        else:
            row.update(layout=f"tp{v.parallel.tp} pp{v.parallel.pp} dp{v.parallel.dp or '*'}",
                       tokens_per_step=w.global_batch * w.seq_length,
                       flops_per_step=flops.train_step_flops(shape, w.global_batch, w.seq_length),
                       memory_per_gpu=flops.memory_estimate_bytes(v)["total"])
        for name, cfg in v.tricks.items():  # a technique may add to the layout and the memory (a draft model)
            extra = registry.trick(name).plan_row(v, cfg) if registry.trick(name).plan_row else {}
            row["layout"] += extra.get("layout", "")
            row["memory_per_gpu"] += extra.get("memory", 0)
            row["flops_per_step"] = extra.get("flops_per_step", row["flops_per_step"])  # one that changes the work
        rows.append(row)
    return rows


# Feasibility: a variant starts only where each process has its plan's memory plus this margin: 10% for
# what the estimate leaves out (allocator fragmentation, temporaries, the KV cache of inference) and
# 1 GiB for the runtime itself (CUDA context and kernels, or torch and megatron-core in host memory).
MARGIN_FRACTION = 0.10
MARGIN_BYTES = 2**30


def memory_per_process(v) -> int:
    """The plan's estimate of one process's memory (bytes): its GPU's, or its host RAM's on CPU."""
    return int(plan_rows([v])[0]["memory_per_gpu"])


def required_bytes(v) -> int:
    return int(memory_per_process(v) * (1 + MARGIN_FRACTION) + MARGIN_BYTES)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(v, nproc: int, local_rank: int | None = None, local_world: int | None = None,
                 gpus: int | None = None) -> str | None:
    """None if ``nproc`` processes of ``v`` fit this machine, else why not, in one line.

    With GPUs: the free memory of GPU ``local_rank`` (the launcher, with ``local_rank`` None: the
    ``nproc`` GPUs with the most free memory, and ``gpus``: how many the host has). Without GPUs: the
    host's available RAM shared by the ``local_world`` processes on this host (default ``nproc``)."""
    from suite.metrics import hardware

    need = required_bytes(v)
    est = memory_per_process(v)
    needs = (f"needs {nproc} GPU{'s' * (nproc != 1)} with >= {need / 2**30:.0f} GiB{' each' * (nproc != 1)} "
             f"(plan estimate {_gib(est)} + {MARGIN_FRACTION:.0%} + {_gib(MARGIN_BYTES)})")
    free = hardware.gpu_free_bytes(local_rank, context=local_rank is not None)
    if gpus and not free:
        return None  # GPUs whose memory the launcher cannot read: each rank checks its own
    if free:
        if local_rank is None:
            free = sorted(free, reverse=True)[:nproc]
            if len(free) < nproc:
                return None  # too few GPUs: the launcher skips that with its own reason
        worst = min(free)
        if worst >= need:
            return None
        if local_rank is not None:
            return f"{needs}; this machine's GPU {local_rank} has {_gib(worst)} free."
        if nproc == 1:
            return f"{needs}; this machine's freest GPU has {_gib(worst)} free."
        return f"{needs}; this machine's {nproc} freest GPUs have as little as {_gib(worst)} free."
    ram = hardware.ram_available_bytes()
    if ram is None:
        return None
    sharing = local_world or nproc
    if ram / sharing >= need:
        return None
    share = f" ({_gib(ram / sharing)} for each of {sharing} processes)" if sharing > 1 else ""
    return f"{needs}; this machine has no GPU and {_gib(ram)} RAM available{share}."


def _inference_row(v, shape) -> dict:
    """Largest grid point: prefill FLOPs, and weight bytes per GPU (bf16 2 bytes, fp32 4).

    A parallel mode may say how many decoder layers each GPU holds and label the layout
    (``ParallelMode.plan_row``)."""
    from suite.registry import PARALLEL_MODES

    p, w = v.parallel, v.workload
    batch, prompt = max(w.batch_sizes), max(w.prompt_lengths)
    layers, label = shape.layers, ""
    for name, cfg in v.modes.items():
        row = PARALLEL_MODES[name].plan_row(v, cfg) if PARALLEL_MODES[name].plan_row else {}
        layers, label = row.get("layers", layers), label + row.get("layout", "")
    embeddings = (1 if p.pp > 1 else 2) * shape.vocab * shape.hidden  # input and output on one stage each
    weights = (layers * flops.layer_params(shape) / p.pp + embeddings) / p.tp
    return {"layout": f"tp{p.tp} pp{p.pp}{label}", "tokens_per_step": batch * prompt,
            "flops_per_step": flops.forward_flops(shape, batch, prompt),
            "memory_per_gpu": weights * (2 if w.bf16 else 4)}


def _si(x: float, unit: str = "") -> str:
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}{unit}"
    return f"{x:g} {unit}".strip()


def print_plan(path: str, overrides, only) -> int:
    variants = load_scenario(path, overrides, only)
    print(f"{variants[0].scenario} ({path}); dp '*' = derived from the launch (1 when launched for you); "
          "FLOPs/step: the run's mean where a technique changes the work; "
          "inference rows: the largest prompt's prefill, and weights only for memory")
    print("| variant | layout | GPUs | parameters | tokens/step | FLOPs/step | est. memory/GPU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in plan_rows(variants):
        print(f"| {r['variant']} | {r['layout']} | {r['gpus']} | {fmt.count(r['parameters'])} | "
              f"{r['tokens_per_step']:,} | {_si(r['flops_per_step'], 'FLOP')} | "
              f"{r['memory_per_gpu'] / 2**30:.2f} GiB |")
    return 0
