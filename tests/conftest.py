"""The GPU tier: tests marked ``gpu`` (``pytest -m gpu``) check on a CUDA GPU what CPU tests cannot (fused,
compiled and float8 kernels against the reference, CUDA-graph decode against eager). On a machine without
CUDA they are skipped with the reason, so the CPU suite stays green and says what it did not run."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: the GPU tier runs with `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
