"""G_stack's growth operator over a full (unsharded) state dict keyed by global parameter names
(``suite.models.gpt.global_names``; ``suite.tricks.multilevel.state`` gathers and scatters it)."""
from __future__ import annotations

import re

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def stack(state: dict, growth: int) -> dict:
    """Layer i + j·n of the result = a copy of layer i (n = layers in ``state``, j < growth); every other
    parameter (embedding, final norm, output layer) is carried over unchanged."""
    layers = {int(m[1]) for m in map(_LAYER.fullmatch, state) if m}
    n = len(layers)
    if layers != set(range(n)):
        raise ValueError(f"layer ids {sorted(layers)} are not 0..{n - 1}")
    out = {}
    for name, x in state.items():
        m = _LAYER.fullmatch(name)
        if m is None:
            out[name] = x
            continue
        for j in range(growth):
            out[f"decoder.layers.{int(m[1]) + j * n}.{m[2]}"] = x.clone()
    return out
