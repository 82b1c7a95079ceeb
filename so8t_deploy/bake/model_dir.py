"""A Hugging Face model directory, validated before anything is read in bulk.

Missing shards, truncated files, index entries that point nowhere, and entries that are not
regular files (a FIFO, a link out of the directory) are input errors (ModelError, exit 2),
found up front rather than halfway through a bake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..jsonfile import read_json_object
from .input_files import check_input_tree
from .layout import LM_HEAD, ModelLayout
from .safetensors_io import FLOAT_DTYPES, ShardHeader, TensorEntry, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelDirectory:
    path: Path
    config: dict[str, Any]
    shards: tuple[ShardHeader, ...]  # in file-name order
    index_metadata: dict[str, Any] | None  # the index's "metadata", or None for a single-file model

    def locate(self, name: str) -> tuple[ShardHeader, TensorEntry] | None:
        for shard in self.shards:
            if name in shard.tensors:
                return shard, shard.tensors[name]
        return None

    @property
    def tensor_names(self) -> set[str]:
        return {name for shard in self.shards for name in shard.tensors}

    @property
    def weight_files(self) -> set[str]:
        names = {shard.path.name for shard in self.shards}
        return names | ({INDEX_FILE} if self.index_metadata is not None else set())


def open_model_dir(path: Path) -> ModelDirectory:
    """Validate a model directory: only safe entries, config, index, every shard present and complete."""
    if not path.is_dir():
        raise ModelError(f"{path}: not a model directory")
    check_input_tree(path, ModelError)
    config = read_json_object(path / "config.json", ModelError)
    index_path = path / INDEX_FILE
    if index_path.exists():
        index = read_json_object(index_path, ModelError)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index_path}: no weight_map")
        shard_names = sorted(set(weight_map.values()))
        for name in shard_names:
            if not (path / name).is_file():
                raise ModelError(f"{path / name}: missing shard (listed in {INDEX_FILE})")
        shards = tuple(read_header(path / name) for name in shard_names)
        by_name = {s.path.name: s for s in shards}
        for tensor, shard_name in weight_map.items():
            if tensor not in by_name[shard_name].tensors:
                raise ModelError(f"{path / shard_name}: tensor {tensor!r} listed in {INDEX_FILE} is missing")
        listed = set(weight_map)
        for shard in shards:
            for tensor in shard.tensors:
                if tensor not in listed:
                    raise ModelError(f"{shard.path}: tensor {tensor!r} is not listed in {INDEX_FILE}")
        metadata = index.get("metadata") or {}
    elif (path / SINGLE_FILE).is_file():
        shards = (read_header(path / SINGLE_FILE),)
        metadata = None
    else:
        found = "pytorch_model.bin" if any(path.glob("*.bin")) else "no weights"
        raise ModelError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} ({found}; only safetensors is supported)")
    return ModelDirectory(path, config, shards, metadata)


def check_shapes(model: ModelDirectory, layout: ModelLayout) -> None:
    """The checkpoint is the model config.json describes: every implied tensor present (lm_head unless tied
    away), a float tensor of the implied shape; each bias as long as its weight; no layer past the last.

    A wrong size would otherwise surface late and obscurely: a fold that cannot broadcast, or a
    converter or quantize that dies on the GGUF (an empty lm_head gave SIGFPE, exit 136)."""
    config = model.path / "config.json"
    expected = layout.expected_shapes()
    for name, dims in expected.items():
        found = model.locate(name)
        if found is None:
            if name == LM_HEAD and layout.tie_word_embeddings:
                continue
            untied = " (tie_word_embeddings is false)" if name == LM_HEAD else ""
            raise ModelError(f"{config}: implies tensor {name!r}{untied}, which the checkpoint lacks")
        shard, entry = found
        if entry.shape != tuple(size for size, _ in dims):
            implied = ", ".join(f"{size} ({field})" for size, field in dims)
            raise ModelError(f"{shard.path}: tensor {name!r} has shape {list(entry.shape)}, "
                             f"but config.json implies [{implied}]")
        if entry.dtype not in FLOAT_DTYPES:
            raise ModelError(f"{shard.path}: tensor {name!r} is {entry.dtype}, not a float tensor")
    for shard in model.shards:
        for name, entry in shard.tensors.items():
            layer = _LAYER_RE.match(name)
            if layer and int(layer[1]) >= layout.num_layers:
                raise ModelError(f"{shard.path}: tensor {name!r} is past the last layer "
                                 f"(config.json num_hidden_layers: {layout.num_layers})")
            weight = expected.get(name.removesuffix(".bias") + ".weight") if name.endswith(".bias") else None
            if weight is not None and entry.shape != (weight[0][0],):
                raise ModelError(f"{shard.path}: tensor {name!r} has shape {list(entry.shape)}, "
                                 f"but its weight has {weight[0][0]} rows ({weight[0][1]})")
