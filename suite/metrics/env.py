"""Environment fingerprint stored with every record: what ran, where, with which software."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path


def git_commit() -> str | None:
    """HEAD of the source tree (with -dirty for uncommitted changes); SUITE_GIT_COMMIT overrides it
    where the tree was copied without its .git (e.g. onto a GPU machine)."""
    if os.environ.get("SUITE_GIT_COMMIT"):
        return os.environ["SUITE_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def boot_id() -> str | None:
    """This boot of this machine (Linux; first 8 hex digits): tells runs on different machines apart where
    hostnames do not (cloned cloud VMs often share theirs), so the gate can say from how many machines a
    baseline's noise floor comes. None elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8] or None
    except OSError:
        return None


# Environment variables that change which kernels run, how they are tuned, or how memory and communication
# behave (e.g. TORCHINDUCTOR_COORDINATE_DESCENT_TUNING, PYTORCH_CUDA_ALLOC_CONF, NCCL_ALGO): a run's numbers
# depend on them as on the code, so every record keeps those that were set. Launcher bookkeeping that differs
# from run to run (RANK, MASTER_PORT, TORCHELASTIC_RUN_ID) matches none of these prefixes, and places on disk
# (TORCHINDUCTOR_CACHE_DIR, TRITON_HOME) change no number.
RESULT_VARIABLE_PREFIXES = ("TORCHINDUCTOR_", "TORCH_", "PYTORCH_", "TRITON_", "NCCL_", "CUBLAS", "CUDNN_",
                            "NVIDIA_TF32_", "CUDA_")
RESULT_VARIABLES = ("OMP_NUM_THREADS",)
PLACE_SUFFIXES = ("_DIR", "_PATH", "_HOME", "_FILE")


def result_variables(environ=None) -> dict:
    """The set environment variables of RESULT_VARIABLE_PREFIXES and RESULT_VARIABLES but places on disk,
    by name."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in sorted(environ)
            if (k.startswith(RESULT_VARIABLE_PREFIXES) or k in RESULT_VARIABLES) and not k.endswith(PLACE_SUFFIXES)}


def fingerprint(world_size: int) -> dict:
    import torch

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:
        mcore = None
    gpu = torch.cuda.is_available()
    env = {
        "gpu_name": torch.cuda.get_device_name() if gpu else None,
        "gpu_count": world_size if gpu else 0,
        "processes": world_size,
        "cpu": platform.processor() or platform.machine(),
        "driver": None,
        "cuda": torch.version.cuda if gpu else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else None,
        "torch": torch.__version__,
        "megatron_core": mcore,
        "python": sys.version.split()[0],
        "hostname": socket.gethostname(),
        "boot_id": boot_id(),
        "git_commit": git_commit(),
        "variables": result_variables(),
    }
    if gpu:
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    return env
