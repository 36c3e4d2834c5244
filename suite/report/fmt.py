"""Number formatting and markdown tables shared by ``suite report`` and ``suite compare``."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from suite.errors import UserError

NA = "n/a"


def sig(x: float, digits: int = 3) -> str:
    """Fixed-point with `digits` significant digits: 0.0167, 1.16, 26.2, 318."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def count(x: float | None) -> str:
    """Human units for counts: 230 k, 26.2 M, 1.16 B; scientific beyond trillions."""
    if x is None:
        return NA
    if abs(x) >= 1e15:
        return f"{x:.2e}"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{sig(x / div)} {suffix}"
    return sig(x) if isinstance(x, float) else str(x)


def fixed(x: float | None, decimals: int, scale: float = 1.0, signed: bool = False, unit: str = "") -> str:
    if x is None:
        return NA
    return f"{x * scale:{'+' if signed else ''}.{decimals}f}{unit}"


def percent(fraction: float | None, decimals: int = 1, signed: bool = False) -> str:
    return fixed(fraction, decimals, 100, signed, "%")


def ms(seconds: float | None) -> str:
    """Milliseconds with one decimal (two below 10 ms, where one would hide real differences)."""
    if seconds is None:
        return NA
    return fixed(seconds, 2 if seconds < 0.01 else 1, 1e3)


def scalar(value) -> str:
    """Any scalar a technique may report in metrics.extra / metrics.target."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return count(value) if abs(value) >= 1e4 else (str(value) if isinstance(value, int) else sig(value))
    return str(value)


def table(headers: list[str], rows: list[list[str]], align: str) -> str:
    """A markdown table; `align` has one letter a column: 'l' for text, 'r' for numbers."""
    def line(cells):
        # A '|' inside a cell (error messages) would split it.
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def check_output(output: str | None) -> None:
    """A UserError, before any work, when `output` cannot be the file a report is written to."""
    if output is None:
        return
    path = Path(output)
    if path.is_dir():
        raise UserError(f"-o {output} is a folder.", file=output,
                        fix=f"name a file, e.g. -o {path / 'report.md'}.")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"-o {output}: {parent} is a file, not a folder.", file=output,
                        fix="write the report into a folder (or a new path).")


def emit(text: str, output: str | None) -> None:
    """Write to `output` (creating its folder) or, without one, to stdout."""
    if output is None:
        sys.stdout.write(text)
        return
    check_output(output)
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write the report ({e.strerror}).", file=output,
                        fix="choose a path you can write to.") from None
