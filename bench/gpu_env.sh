# Source on a GPU machine: installs the carried megatron-core wheel (.whl/) and sets the NCCL
# environment the GPU machines here require. OUT is where results go (collected after the run).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# once per machine (scripts started side by side would race on /tmp/site)
[ -d /tmp/site/megatron ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD
export OUT=${OUT:-/tmp/out}
# a tree snapshot made with `git archive` has no .git: its commit travels in .commit (the records' env.git_commit)
[ -f .commit ] && export SUITE_GIT_COMMIT=$(cat .commit)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
quiet() { grep --line-buffered -v -E "^W[0-9]{4}|UserWarning|warnings.warn|^\*{5}|OMP_NUM_THREADS" ; }
