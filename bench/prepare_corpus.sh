#!/usr/bin/env bash
# Concatenate the shared real-text corpora into .data/ (git-ignored) for the training scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED_DATA:-../shared/data}
mkdir -p .data
cat "$shared/tinyshakespeare/input.txt" "$shared/wikitext-2/valid.txt" > .data/shakespeare_wikitext.txt
wc -c .data/shakespeare_wikitext.txt
