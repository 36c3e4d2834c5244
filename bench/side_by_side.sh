#!/usr/bin/env bash
# Runs one-GPU variants of a scenario side by side on separate GPUs, then renders one report (with its
# loss-curve plot). With more variants than GPUs, GPU i runs variants i, i+G, i+2G, ... in turn. E.g.
#   bash bench/side_by_side.sh scenarios/gpt_multilevel.toml baseline multilevel_2 multilevel_3
# Variants share the host (CPU, PCIe) but no GPU; say so next to walltimes measured this way.
# Results: $OUT/<scenario stem>/gpu<i>/records.jsonl, logs beside, and $OUT/<scenario stem>/report.md.
set -uo pipefail
source bench/gpu_env.sh || exit 1
scenario=$1; shift
res=$OUT/$(basename "$scenario" .toml)
gpus=$(nvidia-smi -L | wc -l)
variants=("$@")
mkdir -p "$res"
for ((i = 0; i < gpus && i < ${#variants[@]}; i++)); do
  args=()
  for ((j = i; j < ${#variants[@]}; j += gpus)); do args+=(--variant "${variants[j]}"); done
  CUDA_VISIBLE_DEVICES=$i python3 -m suite run "$scenario" "${args[@]}" --out "$res/gpu$i" 2>&1 | quiet \
    > "$res/gpu$i.log" &
done
wait
tail -n 3 "$res"/gpu*.log
python3 -m suite report "$res"/gpu*/ -o "$res/report.md" && cat "$res/report.md"
