"""What the machine can do: datasheet peaks (by table) and measured ceilings (probed, cached).

MFU divides by the datasheet dense bf16 peak of a *known* device; an unknown device gives ``None``
(the report prints n/a) rather than a guess. fp8 variants (float8 GEMMs, ``suite.models.fp8``) are
measured against the same bf16 peak, not the float8 one (twice as high): the model FLOPs are the same
count, so their MFU and TFLOP/s compare directly with the bf16 variant's, and a higher MFU is the
speed-up. The measured bf16 GEMM rate is probed once per (device, torch version) and cached in
``~/.cache/suite/ceilings.json`` (``SUITE_CACHE`` overrides).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# Dense bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets (no sparsity).
DATASHEET_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # SXM
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
]


def datasheet_peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, peak in DATASHEET_BF16_TFLOPS:  # most specific names first
        if key in device_name:
            return peak
    return None


def _cache_file() -> Path:
    root = Path(os.environ.get("SUITE_CACHE", Path.home() / ".cache" / "suite"))
    return root / "ceilings.json"


def measured_ceilings() -> dict:
    """{'gemm_tflops', 'copy_tb_s'} for the current GPU; {} on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    key = f"{torch.cuda.get_device_name()}|torch {torch.__version__}"
    path = _cache_file()
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key not in cache:
        cache[key] = {"gemm_tflops": _probe_gemm(), "copy_tb_s": _probe_copy()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    return cache[key]


def _time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _probe_gemm(n: int = 8192) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ b)
    return round(2 * n**3 / ms / 1e9, 1)


def _probe_copy(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy, counting bytes read plus written (TB/s)."""
    import torch

    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return round(2 * nbytes / ms / 1e9, 3)


def ram_available_bytes() -> int | None:
    """The kernel's estimate of memory available to new work without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def gpu_free_bytes(index: int | None = None, context: bool = True) -> list[int] | None:
    """Free memory of each visible GPU (or of GPU ``index`` alone), None without GPUs or when it
    cannot be read.

    With ``context`` (a rank, which holds a CUDA context anyway): ``torch.cuda.mem_get_info``, in
    CUDA's numbering. Without (the launcher): NVML, which reads the driver's numbers without creating
    a context (one costs ~0.5 GiB on every GPU queried, for the whole run), restricted to
    ``CUDA_VISIBLE_DEVICES`` when that lists indices."""
    import torch

    if context:
        if not torch.cuda.is_available():
            return None
        indices = range(torch.cuda.device_count()) if index is None else [index]
        return [torch.cuda.mem_get_info(i)[0] for i in indices]
    try:
        import pynvml

        pynvml.nvmlInit()
        indices = list(range(pynvml.nvmlDeviceGetCount()))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            indices = [int(i) for i in visible.split(",") if i.strip().isdigit()]  # UUIDs: unknown
        if index is not None:
            indices = indices[index:index + 1]
        free = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free for i in indices]
        return free or None
    except Exception:
        return None
