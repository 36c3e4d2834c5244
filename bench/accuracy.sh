#!/usr/bin/env bash
# Evidence for issue 6 (a small model pretrained here, its held-out perplexity) and for CQIL's accuracy
# (issue 3): pretrain scenarios/pretrain_small.toml, measure the similarity of adjacent layers' inputs
# on it, then scenarios/cqil_accuracy.toml (original vs CQIL before and after LoRA + distillation).
# One GPU. Usage on a GPU machine (carry .whl/ and .data/; bash bench/prepare_corpus.sh writes .data):
#   bash bench/accuracy.sh
set -uo pipefail
source bench/gpu_env.sh || exit 1
python3 -m suite run scenarios/pretrain_small.toml --out "$OUT/pretrain_small" 2>&1 | quiet | tee -a "$OUT/accuracy.log"
python3 -m suite analyze similarity scenarios/cqil_accuracy.toml --variant original --threshold 0.9 \
    -o "$OUT/similarity" 2>&1 | quiet | tee -a "$OUT/accuracy.log"
python3 -m suite run scenarios/cqil_accuracy.toml --out "$OUT/cqil_accuracy" 2>&1 | quiet | tee -a "$OUT/accuracy.log"
