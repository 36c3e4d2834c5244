#!/usr/bin/env bash
# The GPU test tier (pytest -m gpu), one test file at a time so that each fits a limited command and a
# time limit ends one file, not the summary of all: the whole tier takes over 10 minutes on one H200
# (test_decode.py and test_fp8.py together 316 s at 4201345). Usage on a GPU machine:
#   bash bench/gpu_tests.sh                           # every file in tests/gpu
#   bash bench/gpu_tests.sh tests/gpu/test_kernels.py  # only these
set -uo pipefail
source bench/gpu_env.sh || exit 1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(tests/gpu/test_*.py)
status=0
for f in "${files[@]}"; do
  python3 -m pytest -q -m gpu -p no:cacheprovider "$f" 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -n 3
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
