"""How a pydantic validation error reads in one line: `field.path[1].name: problem`, never the input's value."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def format_field_path(loc: tuple[Any, ...]) -> str:
    """('targets', 1, 'host') -> 'targets[1].host'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def first_error(error: ValidationError) -> str:
    """The first problem, with its field path and how many more there are; pydantic's own message quotes the
    input, which may be a secret or a whole file, so it is never used."""
    errors = error.errors()
    first = errors[0]
    where = format_field_path(tuple(first["loc"])) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}"
