"""The report modules of the plug-ins (``suite.registry.plugin_modules()``: the built-in ones, then those
named in ``SUITE_PLUGINS``), imported by ``suite.report.plugins`` on first use so that each registers its
report sections, record fields and schema-1 upgrades. A plug-in's report module is its package's
``report`` submodule, when it has one; ``suite/report/`` names no plug-in.

Each listed module must import without torch: the reporter runs on machines without it.
"""
from __future__ import annotations

import importlib.util

from suite.registry import plugin_modules


def _report_modules() -> tuple[str, ...]:
    out = []
    for module in plugin_modules():
        try:
            found = importlib.util.find_spec(f"{module}.report")
        except ModuleNotFoundError:  # a plain module (not a package) has no report submodule
            found = None
        if found is not None:
            out.append(f"{module}.report")
    return tuple(out)


MODULES: tuple[str, ...] = _report_modules()
