"""The one registration point through which plug-ins (techniques, parallel modes) extend reading and
reporting, so that nothing in ``suite/report/`` names a technique.

A plug-in's report module (torch-free) calls ``register(ReportPlugin(...))`` at import. The built-in
ones and those named in ``SUITE_PLUGINS`` are found by ``suite.registry.report_modules`` and imported on
first use. Every hook is optional:

    upgrade_v1(rec)           schema-1 records: adds what the plug-in's own v1 fields imply to the v2 view
                              being built (``rec["layout"]`` keys, ``rec["measures"]``); mutates ``rec``
    fields                    {dotted path: type spec} of record fields the plug-in's sections read, checked
                              on read like the core fields (``suite.records.check_record``)
    layout_label(rec)         a short text for the record's parallel layout ('tp1 × xyz2'), or None
    curve(rec)                the validation curve to plot, [[step, loss, walltime_s, flops, phase], ...], when
                              the plug-in keeps a fuller one than ``metrics.validation_curve``; else None
    body(records)             the tables of a scenario the plug-in claims, replacing the core ones; else None
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
    curve: Callable[[dict], list | None] | None = None
    body: Callable[[list[dict]], list[str] | None] | None = None
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
        from suite.registry import report_modules

        for module in report_modules():
            importlib.import_module(module)
    return list(_PLUGINS.values())


def layout_label(rec: dict) -> str:
    """A plug-in's label for the record's layout, else 'tp1 pp2 dp1'."""
    return _first("layout_label", rec) or f"tp{rec.get('tp')} pp{rec.get('pp')} dp{rec.get('dp')}"


def _first(hook: str, *args):
    """The first non-empty answer of the plug-ins' ``hook``, else None."""
    for p in plugins():
        fn = getattr(p, hook)
        answer = fn(*args) if fn else None
        if answer:
            return answer
    return None


def curve(rec: dict) -> list | None:
    return _first("curve", rec)


def body(records: list[dict]) -> list[str] | None:
    return _first("body", records)


def sections(records: list[dict], ctx: dict) -> list[str]:
    """The markdown parts every plug-in adds to one scenario, in plug-in order."""
    return [part for p in plugins() if p.sections for part in p.sections(records, ctx)]
