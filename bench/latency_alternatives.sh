#!/usr/bin/env bash
# Evidence for issue 16's latency family: scenarios/latency_alternatives.toml on the GPUs of this machine
# (LLaMA-7B bf16, random weights): plain greedy decoding (eager and CUDA graph), speculative decoding with
# a small draft model, self-speculative decoding with the first 8 layers, and CQIL over 2 GPUs alone and with
# the draft (both skipped by the launcher on a one-GPU host). Records, log and report go to $OUT/latency_alternatives.
# Usage on a GPU machine (carry .whl/):
#   bash bench/latency_alternatives.sh                          # every variant that fits
#   bash bench/latency_alternatives.sh baseline speculative     # only these
# Rough cost per variant: ~1-2 min (7B random init, GEMM/copy probes once, 6 requests of a 128- and a
# 2048-token prompt + 64 tokens; the speculative variants run k = 4 draft forwards per verify step); the
# trained pair (train_target, train_draft, then trained, trained_speculative, trained_self_speculative) took
# 4 min 16 s on one H200, the early-exit target (train_target_early_exit, then trained_early_exit,
# trained_self_speculative_early_exit) adds ~2 min: the training variants must run first, in the same command
# or before.
set -uo pipefail
source bench/gpu_env.sh || exit 1
res=$OUT/latency_alternatives
args=()
for v in "$@"; do args+=(--variant "$v"); done
python3 -m suite run scenarios/latency_alternatives.toml ${args[@]+"${args[@]}"} --out "$res" 2>&1 | quiet | tee -a "$OUT/latency_alternatives.log"
python3 -m suite report "$res" -o "$res/report.md" && cat "$res/report.md"
