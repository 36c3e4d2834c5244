"""`suite plan`: what each variant will cost, from the analytic model alone (no torch)."""
from __future__ import annotations

from suite.metrics import flops
from suite.scenario import load_scenario


def plan_rows(variants) -> list[dict]:
    rows = []
    for v in variants:
        shape = flops.Shape.of(v.model)
        mem = flops.memory_estimate_bytes(v)
        w = v.workload
        rows.append({
            "variant": v.name + (" (baseline)" if v.is_baseline else ""),
            "layout": f"tp{v.parallel.tp} pp{v.parallel.pp} dp{v.parallel.dp or '*'}",
            "gpus": v.world_size(),
            "parameters": flops.parameters(shape)["total"],
            "tokens_per_step": w.global_batch * w.seq_length,
            "flops_per_step": flops.train_step_flops(shape, w.global_batch, w.seq_length),
            "memory_per_gpu": mem["total"],
        })
    return rows


def _si(x: float, unit: str = "") -> str:
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}{unit}"
    return f"{x:g} {unit}".strip()


def print_plan(path: str, overrides, only) -> int:
    variants = load_scenario(path, overrides, only)
    print(f"{variants[0].scenario} ({path}); dp '*' = derived from the launch (1 when launched for you)")
    print("| variant | layout | GPUs | parameters | tokens/step | FLOPs/step | est. memory/GPU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in plan_rows(variants):
        print(f"| {r['variant']} | {r['layout']} | {r['gpus']} | {_si(r['parameters'])} | "
              f"{r['tokens_per_step']:,} | {_si(r['flops_per_step'], 'FLOP')} | "
              f"{r['memory_per_gpu'] / 2**30:.2f} GiB |")
    return 0
