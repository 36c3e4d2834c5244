#!/usr/bin/env bash
# Evidence for kernel back-ends and float8 on one GPU: scenarios/kernels.toml (the GPU test tier: bench/gpu_tests.sh)
# (variants as arguments, default all). Usage on a GPU machine: bash bench/kernels.sh [--variant NAME ...]
set -uo pipefail
source bench/gpu_env.sh || exit 1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor  # one compile cache for every variant of the run
res=$OUT/kernels
python3 -m suite run scenarios/kernels.toml --set workload.timeout_s=300 "$@" --out "$res" 2>&1 | quiet | tee -a "$OUT/kernels.log"
python3 -m suite report "$res" -o "$res/report.md"
