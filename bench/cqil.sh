#!/usr/bin/env bash
# Evidence for CQIL (issue 3): scenarios/llama33b.toml on the GPUs of this machine. The launcher runs
# each variant in its own torchrun and skips those needing more GPUs than the host has (2 GPUs: single,
# tp2, pp2, cqil2, cqil2_bypass; 4 GPUs: also tp4, pp4, cqil4, cqil4_bypass). Records, log and report
# go to $OUT/llama33b.
# Usage on a GPU machine (carry .whl/):
#   bash bench/cqil.sh                   # every variant that fits
#   bash bench/cqil.sh single cqil2      # only these: split the variants over several calls if needed
# Rough cost per variant: ~1-2 min (33B random init on the GPU, GEMM/copy probes once, eager and
# CUDA-graph requests of a 2048-token prompt + 32 tokens).
set -uo pipefail
source bench/gpu_env.sh || exit 1
res=$OUT/llama33b
args=()
for v in "$@"; do args+=(--variant "$v"); done
python3 -m suite run scenarios/llama33b.toml ${args[@]+"${args[@]}"} --out "$res" 2>&1 | quiet | tee -a "$OUT/cqil.log"
python3 -m suite report "$res" -o "$res/report.md" && cat "$res/report.md"
