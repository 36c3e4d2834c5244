#!/usr/bin/env bash
# Evidence for token skipping (scenarios/token_skipping.toml): baseline, random-LTD and Mixture-of-Depths,
# three seeds each, one GPU a variant side by side (bench/side_by_side.sh), then the report at an equal
# validation loss: the highest final validation loss of the baseline seeds (a loss every seed reaches).
# Usage on a GPU machine: bash bench/token_skipping.sh
set -uo pipefail
source bench/gpu_env.sh || exit 1
scenario=scenarios/token_skipping.toml
bash bench/side_by_side.sh "$scenario" baseline random_ltd mod baseline_seed2 random_ltd_seed2 mod_seed2 \
  baseline_seed3 random_ltd_seed3 mod_seed3
bash bench/equal_quality_report.sh "$OUT/$(basename "$scenario" .toml)"
