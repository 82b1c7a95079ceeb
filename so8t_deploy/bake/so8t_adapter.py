"""Load and validate an SO8T v1 adapter directory (docs: so8t-adapter-v1.md).

Validation is total: every tensor name must be in the spec's table, with the spec's shape
and dtype, every group must be complete, and the config must agree with the base model.
Anything else is an AdapterError that names the tensor or key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ..errors import AdapterError
from ..jsonfile import read_json_object
from ..validation import first_error
from .base_check import BaseIdentity, check_base_name
from .safetensors_io import read_header

CONFIG_FILE = "so8t_config.json"
WEIGHTS_FILE = "so8t_adapter.safetensors"
SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
REPS = ("vector", "spinor_plus", "spinor_minus")

_SITE_RE = re.compile(rf"^layers\.(0|[1-9]\d*)\.({'|'.join(SITES)})\.(generator|gate)$")
_TRIALITY_RE = re.compile(rf"^layers\.(0|[1-9]\d*)\.triality\.({'|'.join(REPS)})\.(projector|generator|gate)$")
_FINAL_RE = re.compile(r"^final\.(generator|gate)$")


@dataclass(frozen=True)
class BlockGroup:
    generators: torch.Tensor  # [d/8, 8, 8]
    gate: float


@dataclass(frozen=True)
class ProjectedGroup:
    projector: torch.Tensor  # [8, d]
    generator: torch.Tensor  # [8, 8]
    gate: float


@dataclass(frozen=True)
class So8tAdapter:
    path: Path
    hidden_size: int
    num_hidden_layers: int | None
    base_model: str | None
    sites: dict[tuple[int, str], BlockGroup] = field(default_factory=dict)
    triality: dict[tuple[int, str], ProjectedGroup] = field(default_factory=dict)
    final: BlockGroup | None = None

    def check_base(self, hidden_size: int, num_layers: int, base: BaseIdentity, allow_mismatch: bool = False) -> None:
        """The adapter's informative fields, when present, must agree with the base model."""
        where = self.path / CONFIG_FILE
        if self.hidden_size != hidden_size:
            raise AdapterError(f"{where}: hidden_size {self.hidden_size} does not match the base model's {hidden_size}")
        if self.num_hidden_layers is not None and self.num_hidden_layers != num_layers:
            raise AdapterError(
                f"{where}: num_hidden_layers {self.num_hidden_layers} does not match the base model's {num_layers}"
            )
        check_base_name(where, "base_model", self.base_model, base, allow_mismatch)
        layers = [layer for layer, _ in (*self.sites, *self.triality)]
        if layers and max(layers) >= num_layers:
            raise AdapterError(
                f"{self.path / WEIGHTS_FILE}: tensors for layer {max(layers)}, "
                f"but the base model has {num_layers} layers"
            )


class So8tConfig(BaseModel):
    """so8t_config.json (docs: so8t-adapter-v1.md); every key is known, so a typo is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["so8t"] = Field(description="Always 'so8t'.")
    format_version: Literal[1] = Field(description="Always 1.")
    block_size: Literal[8] = Field(description="Always 8.")
    hidden_size: int = Field(description="The base model's hidden size; divisible by 8.")
    num_hidden_layers: int | None = Field(default=None, description="Informative; must match the base if present.")
    base_model: str | None = Field(default=None, description="Informative; must match the base if present.")

    @field_validator("format", "format_version", "block_size", mode="before")
    @classmethod
    def _exact_type(cls, value: Any, info: ValidationInfo) -> Any:
        # JSON true is not 1 and 8.0 is not 8: the contract's constants are compared with their type.
        assert info.field_name is not None, "a field validator always knows its field"
        expected = {"format": "so8t", "format_version": 1, "block_size": 8}[info.field_name]
        if value != expected or type(value) is not type(expected):
            raise ValueError(f"must be {expected!r}, got {value!r}")
        return value

    @field_validator("hidden_size", "num_hidden_layers", mode="before")
    @classmethod
    def _positive_int(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name == "num_hidden_layers":
            return value
        if type(value) is not int or value <= 0:
            raise ValueError(f"must be a positive integer, got {value!r}")
        if info.field_name == "hidden_size" and value % 8:
            raise ValueError(f"{value} is not divisible by 8")
        return value


def _read_config(path: Path) -> So8tConfig:
    config_path = path / CONFIG_FILE
    raw = read_json_object(config_path, AdapterError, f"missing (is {path} an SO8T adapter?)")
    try:
        return So8tConfig.model_validate(raw)
    except ValidationError as e:
        raise AdapterError(f"{config_path}: {first_error(e)}") from None


def _expected_shape(name: str, d: int) -> tuple[int, ...]:
    if m := _SITE_RE.match(name):
        return (d // 8, 8, 8) if m.group(3) == "generator" else ()
    if m := _TRIALITY_RE.match(name):
        return {"projector": (8, d), "generator": (8, 8), "gate": ()}[m.group(3)]
    if m := _FINAL_RE.match(name):
        return (d // 8, 8, 8) if m.group(1) == "generator" else ()
    raise KeyError(name)


def load_so8t_adapter(path: Path) -> So8tAdapter:
    config = _read_config(path)
    d = config.hidden_size
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{weights}: missing")
    header = read_header(weights, AdapterError)
    tensors: dict[str, torch.Tensor] = {}
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        for name, entry in header.tensors.items():
            try:
                shape = _expected_shape(name, d)
            except KeyError:
                raise AdapterError(f"{weights}: unknown tensor {name!r} (not in the SO8T v1 format)") from None
            if entry.dtype != "F32":
                raise AdapterError(f"{weights}: tensor {name!r} must be float32, got {entry.dtype}")
            if entry.shape != shape:
                raise AdapterError(f"{weights}: tensor {name!r} has shape {list(entry.shape)}, expected {list(shape)}")
            tensor = f.get_tensor(name)
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{weights}: tensor {name!r} contains NaN or infinity")
            tensors[name] = tensor
    return _assemble(path, config, tensors)


def _take_group(tensors: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...],
                where: Path) -> list[torch.Tensor] | None:
    present = [f"{prefix}.{p}" in tensors for p in parts]
    if not any(present):
        return None
    if not all(present):
        missing = [f"{prefix}.{p}" for p, ok in zip(parts, present, strict=True) if not ok]
        raise AdapterError(f"{where}: partial group {prefix!r}: missing {', '.join(missing)}")
    return [tensors.pop(f"{prefix}.{p}") for p in parts]


def _assemble(path: Path, config: So8tConfig, tensors: dict[str, torch.Tensor]) -> So8tAdapter:
    where = path / WEIGHTS_FILE
    layers = sorted({int(name.split(".")[1]) for name in tensors if name.startswith("layers.")})
    sites, triality = {}, {}
    for layer in layers:
        for site in SITES:
            group = _take_group(tensors, f"layers.{layer}.{site}", ("generator", "gate"), where)
            if group:
                sites[layer, site] = BlockGroup(group[0], float(group[1]))
        for rep in REPS:
            group = _take_group(tensors, f"layers.{layer}.triality.{rep}", ("projector", "generator", "gate"), where)
            if group:
                triality[layer, rep] = ProjectedGroup(group[0], group[1], float(group[2]))
    final = _take_group(tensors, "final", ("generator", "gate"), where)
    assert not tensors, f"unassigned tensors {sorted(tensors)}"  # every valid name belongs to a group
    return So8tAdapter(
        path=path,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        base_model=config.base_model,
        sites=sites,
        triality=triality,
        final=BlockGroup(final[0], float(final[1])) if final else None,
    )
