"""The one registration point through which plug-ins (techniques, parallel modes) extend reading and
reporting, so that nothing in ``suite/report/`` names a technique.

A plug-in's report module (torch-free) calls ``register(ReportPlugin(...))`` at import. The built-in
ones are listed in ``suite.tricks.report_builtin.MODULES`` and imported on first use. Every hook is
optional:

    upgrade_v1(rec)           schema-1 records: adds what the plug-in's own v1 fields imply to the v2 view
                              being built (``rec["layout"]`` keys, ``rec["measures"]``); mutates ``rec``
    fields                    {dotted path: type spec} of record fields the plug-in's sections read, checked
                              on read like the core fields (``suite.records.check_record``)
    layout_label(rec)         a short text for the record's parallel layout ('tp1 × cqil2'), or None
    sections(records, ctx)    markdown parts appended after a scenario's tables; ``ctx`` holds what the
                              core report computed ({"latency_rows": [...]} for inference scenarios)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class ReportPlugin:
    name: str
    upgrade_v1: Callable[[dict], None] | None = None
    fields: dict = field(default_factory=dict)
    layout_label: Callable[[dict], str | None] | None = None
    sections: Callable[[list[dict], dict], list[str]] | None = None


_PLUGINS: dict[str, ReportPlugin] = {}
_loaded = False


def register(plugin: ReportPlugin) -> ReportPlugin:
    """Adds ``plugin``; a second, different plug-in of the same name is a bug and refused."""
    known = _PLUGINS.setdefault(plugin.name, plugin)
    if known is not plugin and known != plugin:
        raise ValueError(f"report plug-in {plugin.name!r} is registered twice")
    return plugin


def plugins() -> list[ReportPlugin]:
    """Every registered plug-in, the built-in ones imported first (in their listed order)."""
    global _loaded
    if not _loaded:
        _loaded = True
        from suite.tricks.report_builtin import MODULES

        for module in MODULES:
            importlib.import_module(module)
    return list(_PLUGINS.values())


def layout_label(rec: dict) -> str:
    """A plug-in's label for the record's layout, else 'tp1 pp2 dp1'."""
    for p in plugins():
        label = p.layout_label(rec) if p.layout_label else None
        if label:
            return label
    return f"tp{rec.get('tp')} pp{rec.get('pp')} dp{rec.get('dp')}"


def sections(records: list[dict], ctx: dict) -> list[str]:
    """The markdown parts every plug-in adds to one scenario, in plug-in order."""
    return [part for p in plugins() if p.sections for part in p.sections(records, ctx)]
