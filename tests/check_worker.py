"""Runs a test file's ``check_*`` functions in one single-process torch.distributed worker.

megatron-core keeps process groups and the CPU compat layer patches torch globally, so checks that
build real models run in a subprocess (``python tests/test_x.py --worker OUT DIR``) and the pytest
process only reads their JSON results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    """This environment without the torchrun variables of a surrounding launch or an injected fault."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUITE_INJECT_FAULT"):
        env.pop(key, None)
    return env


def run_suite(*args, timeout_s: int = 120) -> subprocess.CompletedProcess:
    """``python -m suite ARGS`` from the repository root, in ``subprocess_env()``."""
    return subprocess.run([sys.executable, "-m", "suite", *map(str, args)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout_s)


def run_worker(test_file: str, folder: Path, timeout_s: int = 300, *args: str) -> dict:
    """{check name: {"error": str | None, "data": ...}} from running test_file's worker
    (``python TEST_FILE --worker OUT DIR ARGS...``)."""
    out = folder / "results.json"
    r = subprocess.run([sys.executable, str(Path(test_file).resolve()), "--worker", str(out), str(folder), *args],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout_s)
    assert r.returncode == 0 and out.exists(), \
        f"worker failed ({r.returncode})\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return json.loads(out.read_text())


def result(worker: dict, name: str):
    entry = worker[name]
    assert entry["error"] is None, f"{name} failed in the worker:\n{entry['error']}"
    return entry["data"]


def worker_main(checks, out_path: str, folder: str, cuda: bool = False) -> int:
    """The worker: world size 1 (over gloo with the CPU compat layer; with ``cuda`` over NCCL on GPU 0,
    megatron's CUDA RNG tracker seeded as the runner seeds it), then every check, each from the same seed."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if cuda:
        torch.cuda.set_device(0)
    else:
        from suite.launch import cpu_compat

        torch.set_num_threads(1)
        cpu_compat.enable()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{folder}/pg_store", rank=0,
                            world_size=1)
    ps.initialize_model_parallel()
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    results = {}
    for check in checks:
        torch.manual_seed(1234)
        try:
            results[check.__name__[len("check_"):]] = {"error": None, "data": check(folder)}
        except Exception:
            results[check.__name__[len("check_"):]] = {"error": traceback.format_exc(), "data": None}
    Path(out_path).write_text(json.dumps(results))
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


def torchrun(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """A real multi-process run of a script or module (`python -m torch.distributed.run ...`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
