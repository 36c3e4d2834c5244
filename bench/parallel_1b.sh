#!/usr/bin/env bash
# Evidence for the foundation: scenarios/gpt1b_parallel.toml on the GPUs of this machine
# (variants needing more GPUs than the host has are skipped by the launcher).
set -uo pipefail
source bench/gpu_env.sh || exit 1
python3 -m suite run scenarios/gpt1b_parallel.toml --out "$OUT/gpt1b_parallel" 2>&1 | quiet | tee "$OUT/gpt1b.log"
python3 -m suite report "$OUT/gpt1b_parallel" -o "$OUT/gpt1b_parallel/report.md"
