"""User-facing errors: one sentence naming the file, the variant, the key and the fix.

Anything raised as ``UserError`` is printed without a traceback and exits with code 2; any other
exception is a bug in `suite` and keeps its traceback.

One idiom per kind of place: a problem with one key of a resolved variant is ``fail(spec, key, message,
fix)``, wherever it is found (validation, plug-ins, data, evaluation); ``UserError(...)`` directly only
where there is no variant yet or at all (scenario files being parsed, records, command-line options).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import NoReturn


@dataclass
class UserError(Exception):
    message: str
    file: str | None = None
    variant: str | None = None
    key: str | None = None
    fix: str | None = None

    def __str__(self) -> str:
        where = [w for w in (self.file, f"variant '{self.variant}'" if self.variant else None,
                             f"key '{self.key}'" if self.key else None) if w]
        text = (": ".join(where) + ": " if where else "") + self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        # One line whatever the input held: a key or value with a newline or control character is escaped.
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(spec, key: str, message: str, fix: str) -> NoReturn:
    """Raise the UserError for one key of one scenario variant (``spec``: a VariantSpec)."""
    raise UserError(message, file=spec.file, variant=spec.name, key=key, fix=fix)


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    # str(): a wrongly typed value (baseline = 3) must still get a message, not a TypeError.
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
