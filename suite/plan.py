"""`suite plan`: what each variant will cost, from the analytic model alone (no torch)."""
from __future__ import annotations

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
                       memory_per_gpu=flops.parameters(shape)["total"] * (2 if w.precision == "bf16" else 4))
        else:
            row.update(layout=f"tp{v.parallel.tp} pp{v.parallel.pp} dp{v.parallel.dp or '*'}",
                       tokens_per_step=w.global_batch * w.seq_length,
                       flops_per_step=flops.train_step_flops(shape, w.global_batch, w.seq_length),
                       memory_per_gpu=flops.memory_estimate_bytes(v)["total"])
        rows.append(row)
    return rows


def _inference_row(v, shape) -> dict:
    """Largest grid point: prefill FLOPs, and weight bytes per GPU (bf16 2 bytes, fp32 4).

    With CQIL every rank holds the layers outside groups and one layer of each group."""
    from suite.parallel.cqil import plan_of

    p, w = v.parallel, v.workload
    batch, prompt = max(w.batch_sizes), max(w.prompt_lengths)
    plan = plan_of(v)
    layers = shape.layers if plan is None else plan.depth
    embeddings = (1 if p.pp > 1 else 2) * shape.vocab * shape.hidden  # input and output on one stage each
    weights = (layers * flops.layer_params(shape) / p.pp + embeddings) / p.tp
    cqil = f" cqil{plan.degree}" if plan else ""
    return {"layout": f"tp{p.tp} pp{p.pp}{cqil}", "tokens_per_step": batch * prompt,
            "flops_per_step": flops.forward_flops(shape, batch, prompt),
            "memory_per_gpu": weights * (2 if w.precision == "bf16" else 4)}


def _si(x: float, unit: str = "") -> str:
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}{unit}"
    return f"{x:g} {unit}".strip()


def print_plan(path: str, overrides, only) -> int:
    variants = load_scenario(path, overrides, only)
    print(f"{variants[0].scenario} ({path}); dp '*' = derived from the launch (1 when launched for you); "
          "inference rows: the largest prompt's prefill, and weights only for memory")
    print("| variant | layout | GPUs | parameters | tokens/step | FLOPs/step | est. memory/GPU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in plan_rows(variants):
        print(f"| {r['variant']} | {r['layout']} | {r['gpus']} | {fmt.count(r['parameters'])} | "
              f"{r['tokens_per_step']:,} | {_si(r['flops_per_step'], 'FLOP')} | "
              f"{r['memory_per_gpu'] / 2**30:.2f} GiB |")
    return 0
