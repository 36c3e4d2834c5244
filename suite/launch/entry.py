"""`suite run`: the SPMD program under torchrun, the launcher that starts torchrun per variant, or
(``--slurm``) one Slurm job per variant."""
from __future__ import annotations

import os


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run(args) -> int:
    if getattr(args, "slurm", None):
        from suite.errors import UserError

        if under_torchrun():
            raise UserError("--slurm submits jobs that start torchrun themselves; it cannot run under torchrun.",
                            key="--slurm", fix="run `python -m suite run FILE --slurm ...` without torchrun.")
        from suite.launch.slurm import submit_all

        return submit_all(args)
    if under_torchrun():
        from suite.launch.spmd import end_rank, run_all

        end_rank(run_all(args))
    from suite.launch.launcher import launch_all

    return launch_all(args)
