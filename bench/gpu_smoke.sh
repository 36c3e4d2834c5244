#!/usr/bin/env bash
# GPU run used for the committed reports: installs the carried megatron-core wheel, runs scenarios,
# writes results and logs under $OUT. Usage (device tool): bash bench/gpu_smoke.sh SCENARIO [ARGS...]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, megatron.core; print(torch.__version__, megatron.core.__version__, torch.cuda.device_count())"
for scenario in "$@"; do
  name=$(basename "$scenario" .toml)
  python3 -m suite run "$scenario" --out "$OUT/$name" 2>&1 | grep -v -E "^W[0-9]|UserWarning|warnings.warn" | tee -a "$OUT/run.log"
  python3 -m suite report "$OUT/$name" -o "$OUT/$name/report.md" 2>&1 | tail -3
done
