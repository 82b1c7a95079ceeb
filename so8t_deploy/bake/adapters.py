"""Adapter kinds, detected from the files present in an adapter directory, and loaded against a base."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from . import lora_adapter, peft_config, so8t_adapter
from .base_check import BaseIdentity, check_base_name
from .input_files import check_input_tree
from .layout import layout_from_config
from .lora_adapter import LoraAdapter
from .model_dir import ModelDirectory
from .so8t_adapter import So8tAdapter

Adapter = So8tAdapter | LoraAdapter


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter entry, in fold order: its directory, its declared kind, and the base-name opt-out."""

    kind: str | None
    path: Path
    allow_base_mismatch: bool = False


AdapterSpecs = Sequence[AdapterSpec | tuple[str | None, Path] | tuple[str | None, Path, bool]]


def as_specs(items: AdapterSpecs) -> list[AdapterSpec]:
    """Accept specs or (kind, path[, allow_base_mismatch]) tuples, as the CLI and the runners pass them."""
    return [item if isinstance(item, AdapterSpec) else AdapterSpec(*item) for item in items]


def detect_kind(path: Path) -> str:
    """The adapter's kind, from its config file; only once every entry is known safe to read."""
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory not found")
    # Before any file is opened: a FIFO named adapter_config.json would block, a link out would be read.
    check_input_tree(path, AdapterError)
    if (path / so8t_adapter.CONFIG_FILE).is_file():
        return "so8t"
    if (path / peft_config.CONFIG_FILE).is_file():
        return "lora"
    raise AdapterError(
        f"{path}: not an adapter (expected {so8t_adapter.CONFIG_FILE} or {peft_config.CONFIG_FILE})"
    )


def load_adapter(path: Path, kind: str | None = None) -> Adapter:
    """Load an adapter; `kind` (from a manifest) must agree with what the files say."""
    detected = detect_kind(path)
    if kind is not None and kind != detected:
        raise AdapterError(f"{path}: declared kind {kind!r}, but the directory holds a {detected} adapter")
    if detected == "so8t":
        return so8t_adapter.load_so8t_adapter(path)
    return lora_adapter.load_lora_adapter(path)


def load_adapters(specs: AdapterSpecs, model: ModelDirectory) -> list[Adapter]:
    """Load every adapter and check what it says about its base model against this one."""
    layout = layout_from_config(model.config, str(model.path / "config.json"))
    base = BaseIdentity.of(model.path, model.config)
    adapters = []
    for spec in as_specs(specs):
        adapter = load_adapter(spec.path, spec.kind)
        if isinstance(adapter, So8tAdapter):
            adapter.check_base(layout.hidden_size, layout.num_layers, base, spec.allow_base_mismatch)
        else:
            check_base_name(spec.path / peft_config.CONFIG_FILE, "base_model_name_or_path",
                            adapter.config.base_model_name_or_path, base, spec.allow_base_mismatch)
        adapters.append(adapter)
    return adapters


def kind_of(adapter: Adapter) -> str:
    return "so8t" if isinstance(adapter, So8tAdapter) else "lora"

