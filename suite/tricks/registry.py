"""Plug-in registry for techniques.

A technique registers a config dataclass for its ``[tricks.<name>]`` section and, optionally,
hooks the runner calls at fixed points (model spec, FLOPs, LR schedule). The runner only talks to
this registry, never to a technique by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Trick:
    name: str
    config: type  # dataclass for [tricks.<name>]
    validate: Callable | None = None  # (variant, trick_config) -> None, raises UserError


TRICKS: dict[str, Trick] = {}


def register(trick: Trick) -> Trick:
    TRICKS[trick.name] = trick
    return trick
