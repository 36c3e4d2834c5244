#!/usr/bin/env bash
# The report of a side-by-side results folder (bench/side_by_side.sh) at an equal validation loss: the
# highest final validation loss among the baseline variants' seeds, so every baseline seed reaches it.
# Usage: bash bench/equal_quality_report.sh RESULTS_FOLDER   (writes RESULTS_FOLDER/report_equal_quality.md)
set -uo pipefail
res=$1
target=$(python3 -c "
import json, pathlib, sys
recs = [json.loads(l) for p in pathlib.Path(sys.argv[1]).glob('gpu*/records.jsonl') for l in open(p)]
print(max(r['metrics']['validation_loss'] for r in recs
          if r['variant'].split('_seed')[0] == 'baseline' and r['status'] == 'ok'))" "$res") || exit 1
echo "equal-quality target (highest final validation loss of the baseline seeds): $target"
python3 -m suite report "$res"/gpu*/ --target-loss "$target" -o "$res/report_equal_quality.md" && cat "$res/report_equal_quality.md"
