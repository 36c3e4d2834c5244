#!/usr/bin/env bash
# Diagnose random-LTD step time on one GPU: constant kept length vs a changing one, and the CUDA
# allocator's expandable segments (dynamic shapes fragment the default caching allocator).
set -uo pipefail
source bench/gpu_env.sh || exit 1
common=(scenarios/gpt_random_ltd.toml --variant random_ltd --set workload.steps=40 --set workload.eval_interval=0 --set eval.validation=false --set workload.log_interval=10)
run() { local name=$1; shift; echo "== $name"; "$@" 2>&1 | quiet | grep -E "step (20|30|40)/|rror" ; }
run "constant 1024" python3 -m suite run "${common[@]}" --set tricks.random_ltd.schedule=\"constant\" --set tricks.random_ltd.min_kept=1024 --out $OUT/a
run "constant 2048 (= S, unwrapped path)" python3 -m suite run "${common[@]}" --set tricks.random_ltd.schedule=\"constant\" --set tricks.random_ltd.min_kept=2048 --out $OUT/b
run "linear 128->2048 over 40" python3 -m suite run "${common[@]}" --set tricks.random_ltd.schedule_steps=40 --out $OUT/c
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
run "constant 1024, expandable segments" python3 -m suite run "${common[@]}" --set tricks.random_ltd.schedule=\"constant\" --set tricks.random_ltd.min_kept=1024 --out $OUT/d
run "linear over 40, expandable segments" python3 -m suite run "${common[@]}" --set tricks.random_ltd.schedule_steps=40 --out $OUT/e
