"""suite.metrics.energy: the meter reads the counter of the process's own GPU, found by UUID, whatever
CUDA_VISIBLE_DEVICES renumbered (a fake NVML of two GPUs; CUDA sees only the second)."""
from __future__ import annotations

import sys
import types

import torch

from suite.metrics.energy import EnergyMeter

UUIDS = ["GPU-0000aaaa-0000-0000-0000-000000000000", "GPU-1111bbbb-1111-1111-1111-111111111111"]


def _fake_nvml(counters: list[int]):
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetHandleByUUID = lambda u: UUIDS.index(u)
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda h: counters[h]
    return nvml


def test_the_meter_reads_the_gpu_cuda_device_0_is(monkeypatch):
    counters = [1_000_000, 5_000_000]  # millijoules
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(counters))
    # CUDA_VISIBLE_DEVICES=1: this process's device 0 is the host's second GPU (torch reports the UUID
    # without NVML's "GPU-" prefix)
    props = types.SimpleNamespace(uuid=UUIDS[1][len("GPU-"):])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props if i == 0 else None)
    meter = EnergyMeter(0)
    meter.start()
    counters[0] += 9_000_000  # the first GPU busy with another run
    counters[1] += 2_500_000
    assert meter.stop_joules() == 2500.0


def test_no_nvml_gives_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    meter = EnergyMeter(0)
    meter.start()
    assert meter.stop_joules() is None
