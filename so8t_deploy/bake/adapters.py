"""Adapter kinds, detected from the files present in an adapter directory."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError
from . import lora_adapter, so8t_adapter
from .lora_adapter import LoraAdapter
from .so8t_adapter import So8tAdapter

Adapter = So8tAdapter | LoraAdapter


def detect_kind(path: Path) -> str:
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory not found")
    if (path / so8t_adapter.CONFIG_FILE).is_file():
        return "so8t"
    if (path / lora_adapter.CONFIG_FILE).is_file():
        return "lora"
    raise AdapterError(
        f"{path}: not an adapter (expected {so8t_adapter.CONFIG_FILE} or {lora_adapter.CONFIG_FILE})"
    )


def load_adapter(path: Path, kind: str | None = None) -> Adapter:
    """Load an adapter; `kind` (from a manifest) must agree with what the files say."""
    detected = detect_kind(path)
    if kind is not None and kind != detected:
        raise AdapterError(f"{path}: declared kind {kind!r}, but the directory holds a {detected} adapter")
    if detected == "so8t":
        return so8t_adapter.load_so8t_adapter(path)
    return lora_adapter.load_lora_adapter(path)
