"""An out-of-tree parallel mode: ``[parallel] mirror = { degree = 2 }`` runs the inference model on
tp x pp x degree processes, every one holding the whole model, and averages each layer's output over
the mirror ranks (an all-reduce per layer: the same values, so the same tokens).

It answers the parallel-mode hooks (``suite.registry.ParallelMode``): a typed table, validation, a
world-size rule, process groups and a layer spec (its runtime), the plan row, and the record's layout
keys and ``metrics.mirror`` block. Torch is imported by the runtime only.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from suite import errors
from suite.fields import doc
from suite.registry import ModeRuntime, ParallelMode, register_mode


@dataclass
class MirrorConfig:
    """[parallel] mirror = {...}"""

    degree: int = doc("Processes that each run the whole model.", 2, range="[1, 64]")


def validate(spec, cfg: MirrorConfig) -> None:
    p = spec.parallel
    if spec.workload.kind != "inference":
        errors.fail(spec, "workload.kind", "mirror runs the inference workload.", 'set kind = "inference".')
    if p.tp != 1 or p.pp != 1:
        errors.fail(spec, "parallel.tp" if p.tp != 1 else "parallel.pp", "mirror runs with tp = pp = 1.",
                    "remove tp and pp.")


class Runtime(ModeRuntime):
    def __init__(self, spec, cfg: MirrorConfig, timeout_s=None):
        import datetime

        import torch.distributed as dist

        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        self.group = dist.new_group(list(range(cfg.degree)), timeout=timeout)  # collective: every rank

    def layer_spec(self, spec):
        from megatron.core.transformer.spec_utils import ModuleSpec

        from mirror.layer import MirrorLayer

        return ModuleSpec(module=MirrorLayer, submodules=spec.submodules, params={"group": self.group})

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group(self.group)


def describe(spec, cfg: MirrorConfig) -> dict:
    """The record's metrics.mirror: the degree, and how often this rank's layers all-reduced (the proof
    that the model was built from the mode's layer spec)."""
    layer = sys.modules.get("mirror.layer")
    return {"degree": cfg.degree, "layer_all_reduces": layer.CALLS["all_reduce"] if layer else 0}


register_mode(ParallelMode(
    name="mirror", config=MirrorConfig, doc="Every process runs the whole model; layer outputs are averaged.",
    validate=validate, width="mirror degree",
    world_size=lambda spec, cfg: cfg.degree if spec.workload.kind == "inference" else None,
    runtime=lambda spec, cfg, timeout_s=None: Runtime(spec, cfg, timeout_s),
    plan_row=lambda spec, cfg: {"layout": f" mirror{cfg.degree}"},
    layout=lambda spec, cfg: {"dp": 1, "mirror_degree": cfg.degree},
    describe=describe))
