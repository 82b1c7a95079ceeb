"""What every manifest model shares: frozen, strict, finite, and paths resolved against the manifest.

Validators receive the manifest's directory through pydantic's validation context (``{"base_dir": Path}``).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationInfo

from ..frozen import Frozen

__all__ = ["MAX_TIMEOUT_S", "SLUG_RE", "Frozen", "base_dir", "resolve_local"]

MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: longer is a typo, and an infinite one a hang
# Variant and target names share Ollama's model-name alphabet, so '{variant}-{quant}' is always a valid tag.
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir", "."))


def resolve_local(raw: str, info: ValidationInfo) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (base_dir(info) / path).resolve()

