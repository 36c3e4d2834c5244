"""GPU energy over a timed region from NVML's cumulative energy counter (pynvml).

No NVML (CPU machine, missing driver, counter unsupported) gives ``None``, never a crash.
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
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
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
