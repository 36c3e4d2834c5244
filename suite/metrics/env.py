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
    }
    if gpu:
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    return env
