"""G_stack's growth operator over a full (unsharded) state dict keyed by global parameter names
(``suite.models.gpt.global_names``; ``suite.tricks.multilevel.state`` gathers and scatters it)."""
from __future__ import annotations

import re

from suite.tricks.multilevel.operators import copy_layers

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def stack(state: dict, growth: int) -> dict:
    """Layer i + j·n of the result = a copy of layer i (n = layers in ``state``, j < growth); every other
    parameter (embedding, final norm, output layer) is carried over unchanged."""
    layers = {int(m[1]) for m in map(_LAYER.fullmatch, state) if m}
    n = len(layers)
    if layers != set(range(n)):
        raise ValueError(f"layer ids {sorted(layers)} are not 0..{n - 1}")
    return copy_layers(state, lambda i: (i + j * n for j in range(growth)))
