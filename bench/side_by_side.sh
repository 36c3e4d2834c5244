#!/usr/bin/env bash
# Runs one-GPU variants of a scenario side by side, each on its own GPU, then renders one report (with
# its loss-curve plot). For training comparisons that would not fit one call in sequence, e.g. issue 5:
#   bash bench/side_by_side.sh scenarios/gpt_multilevel.toml baseline multilevel_2 multilevel_3
# Variants share the host (CPU, PCIe) but no GPU; say so next to walltimes measured this way.
# Results: $OUT/<scenario stem>/<variant>/records.jsonl and $OUT/<scenario stem>/report.md.
set -uo pipefail
source bench/gpu_env.sh || exit 1
scenario=$1; shift
res=$OUT/$(basename "$scenario" .toml)
gpus=$(nvidia-smi -L | wc -l)
(( $# <= gpus )) || { echo "$# variants need $# GPUs, this machine has $gpus" >&2; exit 1; }
i=0
for v in "$@"; do
  CUDA_VISIBLE_DEVICES=$i python3 -m suite run "$scenario" --variant "$v" --out "$res/$v" 2>&1 | quiet \
    > "$res-$v.log" &
  i=$((i + 1))
done
wait
tail -n 3 "$res"-*.log
python3 -m suite report "${@/#/$res/}" -o "$res/report.md" && cat "$res/report.md"
