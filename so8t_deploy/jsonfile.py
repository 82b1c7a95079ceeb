"""Read a JSON object from a user-supplied file, with the file named in every error."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InvalidInputError


def read_json_object(path: Path, error: type[InvalidInputError], missing: str = "missing") -> dict:
    """The file's JSON object; `error(...)` naming the file if it is absent, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
