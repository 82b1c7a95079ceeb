"""Load and validate an SO8T v1 adapter directory (docs: so8t-adapter-v1.md).

Validation is total: every tensor name must be in the spec's table, with the spec's shape
and dtype, every group must be complete, and the config must agree with the base model.
Anything else is an AdapterError that names the tensor or key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterError
from ..jsonfile import read_json_object
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

    @property
    def files(self) -> list[Path]:
        return [self.path / CONFIG_FILE, self.path / WEIGHTS_FILE]

    def check_base(self, hidden_size: int, num_layers: int, model_names: set[str]) -> None:
        """The adapter's informative fields, when present, must agree with the base model."""
        where = self.path / CONFIG_FILE
        if self.hidden_size != hidden_size:
            raise AdapterError(f"{where}: hidden_size {self.hidden_size} does not match the base model's {hidden_size}")
        if self.num_hidden_layers is not None and self.num_hidden_layers != num_layers:
            raise AdapterError(
                f"{where}: num_hidden_layers {self.num_hidden_layers} does not match the base model's {num_layers}"
            )
        if self.base_model is not None and not _same_model(self.base_model, model_names):
            raise AdapterError(f"{where}: base_model {self.base_model!r} does not match the base model")
        layers = [layer for layer, _ in (*self.sites, *self.triality)]
        if layers and max(layers) >= num_layers:
            raise AdapterError(
                f"{self.path / WEIGHTS_FILE}: tensors for layer {max(layers)}, "
                f"but the base model has {num_layers} layers"
            )


def _same_model(base_model: str, model_names: set[str]) -> bool:
    """Match a hub id or path by its full value or its last component (a local copy keeps the name)."""
    wanted = base_model.rstrip("/")
    return any(name.rstrip("/") == wanted or Path(name).name == Path(wanted).name for name in model_names if name)


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    config = read_json_object(config_path, AdapterError, f"missing (is {path} an SO8T adapter?)")
    expected = {"format": "so8t", "format_version": 1, "block_size": 8}
    for key, value in expected.items():
        if key not in config:
            raise AdapterError(f"{config_path}: {key}: required key is missing")
        if config[key] != value or type(config[key]) is not type(value):
            raise AdapterError(f"{config_path}: {key}: must be {value!r}, got {config[key]!r}")
    hidden = config.get("hidden_size")
    if type(hidden) is not int or hidden <= 0:
        raise AdapterError(f"{config_path}: hidden_size: must be a positive integer, got {hidden!r}")
    if hidden % 8:
        raise AdapterError(f"{config_path}: hidden_size: {hidden} is not divisible by 8")
    layers = config.get("num_hidden_layers")
    if layers is not None and (type(layers) is not int or layers <= 0):
        raise AdapterError(f"{config_path}: num_hidden_layers: must be a positive integer, got {layers!r}")
    base = config.get("base_model")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{config_path}: base_model: must be a string")
    unknown = set(config) - {*expected, "hidden_size", "num_hidden_layers", "base_model"}
    if unknown:
        raise AdapterError(f"{config_path}: {sorted(unknown)[0]}: unknown key")
    return config


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
    d = config["hidden_size"]
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


def _take_group(tensors: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...], where: Path) -> list | None:
    present = [f"{prefix}.{p}" in tensors for p in parts]
    if not any(present):
        return None
    if not all(present):
        missing = [f"{prefix}.{p}" for p, ok in zip(parts, present, strict=True) if not ok]
        raise AdapterError(f"{where}: partial group {prefix!r}: missing {', '.join(missing)}")
    return [tensors.pop(f"{prefix}.{p}") for p in parts]


def _assemble(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> So8tAdapter:
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
        hidden_size=config["hidden_size"],
        num_hidden_layers=config.get("num_hidden_layers"),
        base_model=config.get("base_model"),
        sites=sites,
        triality=triality,
        final=BlockGroup(final[0], float(final[1])) if final else None,
    )
