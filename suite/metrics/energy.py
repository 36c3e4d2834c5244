"""GPU energy over a timed region from NVML's cumulative energy counter (pynvml).

No NVML (CPU machine, missing driver, counter unsupported) gives ``None``, never a crash.

NVML numbers every GPU of the host; CUDA numbers only those ``CUDA_VISIBLE_DEVICES`` lists, in its order, so
CUDA device 0 of a process started with ``CUDA_VISIBLE_DEVICES=1`` is NVML's device 1. The meter finds the
process's GPU by its UUID, which both name alike. (Until this was so, a run pinned to another GPU than the
host's first metered the first: see reports/README.md, energy.)
"""
from __future__ import annotations


class EnergyMeter:
    def __init__(self, device_index: int | None):
        self.handle = None
        self.start_mj = None
        if device_index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = nvml_handle(pynvml, device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # raises if unsupported
        except Exception:
            self.handle = None

    def _read_mj(self):
        import pynvml

        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def start(self) -> None:
        if self.handle is not None:
            self.start_mj = self._read_mj()

    def stop_joules(self) -> float | None:
        if self.handle is None or self.start_mj is None:
            return None
        return (self._read_mj() - self.start_mj) / 1000.0


def nvml_handle(pynvml, cuda_index: int):
    """NVML's handle of CUDA device ``cuda_index`` of this process (see the module docstring)."""
    import torch

    uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
