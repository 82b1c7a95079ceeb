"""How a pydantic validation error reads in one line: `field.path[1].name: problem`, never the input's value."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails


def format_field_path(loc: tuple[Any, ...]) -> str:
    """('targets', 1, 'host') -> 'targets[1].host'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def describe(error: ErrorDetails, known: Callable[[tuple[Any, ...]], Iterable[str]] | None = None) -> str:
    """One problem as `field.path[1]: message`: an unknown or a missing key said plainly (with the closest key
    `known(loc)` lists), a literal's allowed values with what was given, pydantic's "Value error, " dropped.
    pydantic's own `str()` quotes every input, which may be a secret or a whole file: it is never used."""
    loc = tuple(error["loc"])
    kind, message = error["type"], error["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        message = "unknown key"
        if known is not None and (close := difflib.get_close_matches(str(loc[-1]), list(known(loc)), n=1)):
            message += f"; did you mean {close[0]!r}?"
    elif kind == "missing":
        message = "required key is missing"
    elif kind in ("literal_error", "enum"):
        message = f"must be {error.get('ctx', {}).get('expected', '?')}, got {error.get('input')!r}"
    return f"{format_field_path(loc) or '(top level)'}: {message}"


def first_error(error: ValidationError) -> str:
    """The first problem (see describe), and how many more there are."""
    errors = error.errors()
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return describe(errors[0]) + more
