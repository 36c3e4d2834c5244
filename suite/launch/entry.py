"""`suite run`: the SPMD program under torchrun, or the launcher that starts torchrun per variant."""
from __future__ import annotations

import os


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run(args) -> int:
    if under_torchrun():
        from suite.launch.spmd import run_all

        return run_all(args)
    from suite.launch.launcher import launch_all

    return launch_all(args)
