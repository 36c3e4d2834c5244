#!/usr/bin/env bash
# Evidence for model growth (scenarios/growth.toml): baseline, the 2-level V-cycle and depth stacking, three
# seeds each, one GPU a variant side by side (bench/side_by_side.sh), then the report at an equal validation
# loss: the highest final validation loss of the baseline seeds (a loss every seed reaches).
# Usage on a GPU machine: bash bench/growth.sh
set -uo pipefail
source bench/gpu_env.sh || exit 1
scenario=scenarios/growth.toml
bash bench/side_by_side.sh "$scenario" baseline multilevel_2 stacking baseline_seed2 multilevel_2_seed2 \
  stacking_seed2 baseline_seed3 multilevel_2_seed3 stacking_seed3
bash bench/equal_quality_report.sh "$OUT/$(basename "$scenario" .toml)"
