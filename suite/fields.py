"""Documented dataclass fields: ``doc(...)`` and the range notation every scenario section uses.

A small module of its own so that the core schema (``suite.scenario.schema``) and the plug-ins'
sections (``[tricks.<name>]``, ``[parallel] <mode> = {...}``) import it without importing each other.
It imports nothing of suite.
"""
from __future__ import annotations

import math
from dataclasses import field
from typing import Any

BIG = 10**9  # upper bound of counts (steps, intervals): larger values are typos, not plans


def doc(text: str, default: Any = None, *, choices: tuple | None = None, range: str | None = None, factory=None):
    """A dataclass field with its documentation, allowed values and numeric range attached.

    ``range`` is an interval in the usual notation, e.g. ``"[1, 4096]"`` or ``"(0, 1)"`` (round brackets
    exclude the end); it applies to the value, or to every item of a list. ``suite.scenario.loader``
    checks it for every section (the techniques' included), so no key needs its own bounds check, and
    numbers that are not finite (nan, inf) are rejected everywhere.
    """
    if range is not None:
        parse_range(range)  # a malformed range is a bug here, found at import
    meta = {"doc": text, "choices": choices, "range": range}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def parse_range(text: str) -> tuple[float, bool, float, bool]:
    """'[1, 4096]' -> (1, True, 4096, True): low, low included, high, high included."""
    low, high = text[1:-1].split(",")
    return float(low), text[0] == "[", float(high), text[-1] == "]"


def _number(x: float) -> str:
    """1000000000.0 -> '1000000000', 1e20 -> '1e+20', 0.5 -> '0.5'."""
    return str(int(x)) if x.is_integer() and abs(x) < 1e16 else f"{x:g}"


def describe_range(text: str | None) -> str:
    """'[1, 4096]' -> 'between 1 and 4096'; '(0, 1)' -> 'above 0 and below 1' (for the fix of an error)."""
    if text is None:
        return "that is finite"
    low, low_in, high, high_in = (_number(x) if isinstance(x, float) else x for x in parse_range(text))
    if low_in and high_in:
        return f"between {low} and {high}"
    return f"{'at least' if low_in else 'above'} {low} and {'at most' if high_in else 'below'} {high}"


def out_of_range(value, text: str | None) -> str | None:
    """Why ``value`` (a number, or a list of them) breaks the range ``text``; None when it is fine."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # types are checked by the loader; this checks numbers only
        if isinstance(v, float) and not math.isfinite(v):
            return f"{v} is not a finite number"
        if text is None:
            continue
        low, low_in, high, high_in = parse_range(text)
        if not ((low <= v if low_in else low < v) and (v <= high if high_in else v < high)):
            return f"{v!r} is outside {text}"
    return None


