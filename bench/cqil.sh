#!/usr/bin/env bash
# Evidence for CQIL (issue 3): scenarios/llama33b.toml on the GPUs of this machine. The launcher runs
# each variant in its own torchrun and skips those needing more GPUs than the host has (2 GPUs: single,
# tp2, pp2, cqil2, cqil2_bypass; 4 GPUs: also cqil4 and tp4). Records, logs and reports go to $OUT.
# Usage on a device machine (carry .whl/):
#   bash bench/cqil.sh                   # every variant that fits
#   bash bench/cqil.sh single cqil2      # only these: split the variants over several calls if needed
# Rough cost per variant: ~1-2 min (33B random init on the GPU, probe of GEMM/copy ceilings once,
# eager and CUDA-graph requests of a 2048-token prompt + 32 tokens).
set -uo pipefail
source bench/gpu_env.sh || exit 1
res=$OUT/llama33b
args=()
for v in "$@"; do args+=(--variant "$v"); done
python3 -m suite run scenarios/llama33b.toml ${args[@]+"${args[@]}"} --out "$res" 2>&1 | quiet | tee -a "$OUT/cqil.log"
python3 -m suite report "$res" -o "$res/report.md"
# The latency grid (metrics.inference), until the reporter renders it: one row per variant and point.
python3 - "$res/records.jsonl" > "$res/latency.md" <<'PY'
import json, sys
recs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    recs[r["variant"]] = r  # the latest record of each variant
base = {(e["batch"], e["prompt"], e["gen"], e["cuda_graph"]): e
        for e in (recs.get("single") or {}).get("metrics", {}).get("inference", [])}
f = lambda x, spec: "n/a" if x is None else format(x, spec)
print("| variant | GPUs | batch | prompt | gen | decode | first token ms (p90) | decode ms/token (p90) | "
      "decode cut vs single | tokens/s | decode bandwidth / copy ceiling | prefill MFU | graph vs eager logits |")
print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for name, r in recs.items():
    if r["status"] != "ok":
        print(f"| {name} | {r['world_size']} | failed: {r['error']['type']}: {r['error']['message'][:80]} |")
        continue
    for e in r["metrics"]["inference"]:
        b = base.get((e["batch"], e["prompt"], e["gen"], e["cuda_graph"]))
        cut = 1 - e["decode_ms_median"] / b["decode_ms_median"] if b and e["decode_ms_median"] else None
        print(f"| {name} | {r['world_size']} | {e['batch']} | {e['prompt']} | {e['gen']} | "
              f"{'graph' if e['cuda_graph'] else 'eager'} | {f(e['prefill_ms_median'], '.1f')} "
              f"({f(e['prefill_ms_p90'], '.1f')}) | {f(e['decode_ms_median'], '.2f')} ({f(e['decode_ms_p90'], '.2f')}) | "
              f"{f(cut, '.1%')} | {f(e['decode_tokens_per_s'], '.1f')} | {f(e['decode_bandwidth_fraction'], '.1%')} | "
              f"{f(e['prefill_mfu'], '.1%')} | {f(e.get('graph_logits_rel_diff'), '.1e')} |")
PY
cat "$res/latency.md"
