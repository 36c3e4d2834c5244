"""Plug-in registry for techniques.

A technique registers a ``Trick``: the dataclass of its ``[tricks.<name>]`` section, a validator,
and a factory for a ``TrickRuntime`` that the trainer calls at fixed points. The runner talks only
to this interface, never to a technique by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class TrickRuntime:
    """Hooks a technique may override; the defaults leave training unchanged."""

    def layer_spec(self, spec):
        """The megatron-core layer ModuleSpec to build the model with."""
        return spec

    def begin_step(self, step: int) -> None:
        """Called before every optimizer step (training only)."""

    def begin_microbatch(self, sample_offset: int) -> None:
        """Called before each micro-batch's forward with the index of its first sample in the
        global batch (identical on every TP/PP rank that processes it)."""

    def step_flops(self, step: int) -> int | None:
        """Model FLOPs of optimizer step ``step`` if the technique changes them, else None."""
        return None

    def lr_units(self) -> tuple[float, Callable[[int], float]] | None:
        """(units per baseline step, units consumed by step t) to drive the LR schedule by
        something other than steps, else None."""
        return None

    def extra(self) -> dict:
        """Technique-specific measurements for the record's metrics.extra."""
        return {}

    def step_point(self, step: int) -> dict:
        """Where step ``step`` sits in the technique's schedule when it changes the step's shape (e.g.
        {"kept": 256}), else {}: the record then holds one step-time measure per schedule position
        instead of one pooled spread."""
        return {}


@dataclass
class Trick:
    name: str
    config: type  # dataclass for [tricks.<name>]
    validate: Callable | None = None  # (variant, trick_config) -> None; raises UserError
    runtime: Callable | None = None  # (variant, trick_config) -> TrickRuntime
    workload: str | None = None  # module replacing the workload loop (see suite.workloads)


TRICKS: dict[str, Trick] = {}


def register(trick: Trick) -> Trick:
    TRICKS[trick.name] = trick
    return trick
