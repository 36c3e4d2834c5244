"""Workloads: what a variant runs. Each is a module with ``run(spec, ctx, fault) -> raw`` (on every
rank) and ``metrics(raw, spec, ctx) -> dict`` (the record's metrics; may use collectives).

A technique that replaces the whole loop (e.g. a multi-level V-cycle) registers ``workload`` in its
``Trick`` (``suite.registry``; two such techniques in one variant are refused at validation); otherwise
``[workload] kind`` picks the module.
"""
from __future__ import annotations

import importlib

from suite import registry

KINDS = {"train": "suite.workloads.train", "inference": "suite.workloads.inference",
         "accuracy": "suite.workloads.accuracy"}


def workload_for(spec):
    for name in spec.tricks:
        module = registry.trick(name).workload
        if module:
            return importlib.import_module(module)
    return importlib.import_module(KINDS[spec.workload.kind])
