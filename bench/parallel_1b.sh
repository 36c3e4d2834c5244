#!/usr/bin/env bash
# Evidence for the foundation: scenarios/gpt1b_parallel.toml on the GPUs of this machine
# (variants needing more GPUs than the host has are skipped by the launcher), then a profiled pass of
# the multi-GPU variants (3 steps after warm-up, torch.profiler): where their time goes, communication
# kernels included (SUITE_PROFILE; not timed records: profiling slows the steps it traces).
# Usage on a GPU machine: bash bench/parallel_1b.sh [--profile-only]
set -uo pipefail
source bench/gpu_env.sh || exit 1
if [ "${1:-}" != "--profile-only" ]; then
  python3 -m suite run scenarios/gpt1b_parallel.toml --set workload.timeout_s=300 --out "$OUT/gpt1b_parallel" 2>&1 | quiet | tee "$OUT/gpt1b.log"
  python3 -m suite report "$OUT/gpt1b_parallel" -o "$OUT/gpt1b_parallel/report.md"
fi
SUITE_PROFILE="$OUT/profile" python3 -m suite run scenarios/gpt1b_parallel.toml --variant tp1_dp2 --variant tp2 --variant pp2 \
  --set workload.steps=14 --set workload.timeout_s=300 --out /tmp/gpt1b_profiled 2>&1 | quiet | tail -n 20
