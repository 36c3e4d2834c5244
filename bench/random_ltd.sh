#!/usr/bin/env bash
# Evidence for random-LTD on one GPU: baseline and random-LTD at equal steps, then random-LTD run to
# the baseline's final validation loss. Usage on a GPU machine: bash bench/random_ltd.sh
set -uo pipefail
source bench/gpu_env.sh || exit 1
res=$OUT/gpt_random_ltd
python3 -m suite run scenarios/gpt_random_ltd.toml --variant baseline --variant random_ltd --out "$res" 2>&1 | quiet | tee "$OUT/random_ltd.log"
target=$(python3 -c "
import json
recs=[json.loads(l) for l in open('$res/records.jsonl')]
print([r for r in recs if r['variant']=='baseline' and r['status']=='ok'][-1]['metrics']['validation_loss'])")
echo "target loss (baseline final validation loss): $target" | tee -a "$OUT/random_ltd.log"
python3 -m suite run scenarios/gpt_random_ltd.toml --variant random_ltd_to_target --set workload.target_loss=$target --out "$res" 2>&1 | quiet | tee -a "$OUT/random_ltd.log"
python3 -m suite report "$res" -o "$res/report.md"
