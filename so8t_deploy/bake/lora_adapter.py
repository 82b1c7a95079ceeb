"""Load and validate a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

Every tensor PEFT's `save_pretrained` writes for a LoRA is sorted into what the bake folds:
low-rank pairs (linear or embedding layout, with a DoRA magnitude and a lora_B bias when the
config asks for them), and whole tensors that replace the base's (modules_to_save, trained
biases, a targeted embedding's base_layer, resized embeddings). Small tensors are read now;
whole-tensor replacements are only located, and read one at a time by the bake.
A tensor that fits none of these is an error, never ignored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import AdapterError
from .peft_config import PeftLoraConfig, read_peft_config
from .safetensors_io import FLOAT_DTYPES, TensorEntry, map_range, read_header

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")

_PAIR_PARTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
               "lora_magnitude_vector", "lora_magnitude_vector.weight")
# base_layer.*: a targeted module's own (saved) tensor; modules_to_save.*: older PEFT's key for a saved module;
# a bare weight or bias: a saved module, a trained bias, or an embedding saved because it was resized.
_WHOLE_PARTS = ("base_layer.weight", "base_layer.bias", "modules_to_save.weight", "modules_to_save.bias",
                "weight", "bias")
_KEY_RE = re.compile(
    rf"^{re.escape(PEFT_PREFIX)}(?P<module>[\w.]+?)\.(?P<part>{'|'.join(map(re.escape, _PAIR_PARTS + _WHOLE_PARTS))})$"
)


@dataclass(frozen=True)
class TensorRef:
    """A tensor inside an adapter file, located now and read when the bake reaches it."""

    path: Path
    entry: TensorEntry

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def dtype(self) -> str:
        return self.entry.dtype

    def read(self) -> torch.Tensor:
        """The raw bytes, as uint8, mapped from the file for as long as the tensor lives."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return map_range(fd, self.entry.start, self.entry.nbytes)
        finally:
            os.close(fd)  # the mapping keeps the file open itself


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update, in PEFT's layout for its layer kind."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    a: torch.Tensor  # linear: lora_A [r, in]; embedding: lora_embedding_A [r, vocab]
    b: torch.Tensor  # linear: lora_B [out, r]; embedding: lora_embedding_B [hidden, r]
    scaling: float
    embedding: bool = False
    magnitude: torch.Tensor | None = None  # DoRA: linear [out], embedding [hidden]
    bias: torch.Tensor | None = None  # lora_B.bias [out] (lora_bias)


@dataclass(frozen=True)
class Replacement:
    """A whole tensor of the adapter that takes the place of the base's `tensor`."""

    tensor: str  # the model's tensor name, e.g. "lm_head.weight"
    ref: TensorRef
    key: str  # the adapter's own key, for messages


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    config: PeftLoraConfig
    modules: tuple[LoraModule, ...]
    replacements: tuple[Replacement, ...]

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files saved with the adapter (trainers save them when they add tokens)."""
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]


class _TensorFile(Protocol):
    """An open safetensors file (safetensors.safe_open with framework="pt")."""

    def get_tensor(self, name: str) -> torch.Tensor: ...


def _read_pair_tensor(f: _TensorFile, name: str, entry: TensorEntry, where: Path) -> torch.Tensor:
    if entry.dtype not in FLOAT_DTYPES or len(entry.shape) not in (1, 2):
        raise AdapterError(f"{where}: tensor {name!r} must be a float vector or matrix")
    tensor = f.get_tensor(name)
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"{where}: tensor {name!r} contains NaN or infinity")
    return tensor


def _sort_tensors(weights: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[Replacement]]:
    """Small per-module tensors by module and part; whole tensors as located replacements."""
    from safetensors import safe_open

    header = read_header(weights, AdapterError)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements = []
    with safe_open(weights, framework="pt") as f:
        for name, entry in header.tensors.items():
            match = _KEY_RE.match(name)
            # A LoRA part we do not know (lora_C.weight, ...) must not pass for a saved module's weight.
            if not match or any(part.startswith("lora_") for part in match["module"].split(".")):
                raise AdapterError(f"{weights}: unsupported tensor {name!r} (not a PEFT LoRA tensor)")
            module, part = match["module"], match["part"]
            if part in _WHOLE_PARTS:
                if entry.dtype not in FLOAT_DTYPES:
                    raise AdapterError(f"{weights}: tensor {name!r} must be a float tensor")
                param = part.rpartition(".")[2]
                replacements.append(Replacement(f"{module}.{param}", TensorRef(weights, entry), name))
            else:
                parts.setdefault(module, {})[part.removesuffix(".weight")] = _read_pair_tensor(f, name, entry, weights)
    return parts, replacements


def _module(name: str, found: dict[str, torch.Tensor], config: PeftLoraConfig, weights: Path) -> LoraModule:
    embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    for key in (a_key, b_key):
        if key not in found:
            raise AdapterError(f"{weights}: module {name!r} has no {key} (partial pair)")
    a, b = found[a_key], found[b_key]
    rank = config.rank_of(name)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise AdapterError(f"{weights}: module {name!r} has rank {a.shape[0]}x{b.shape[-1]}, config r is {rank}"
                           f"{' (rank_pattern)' if rank != config.r else ''}")
    magnitude = found.get("lora_magnitude_vector")
    if (magnitude is not None) != config.use_dora:
        problem = "has a DoRA magnitude, but use_dora is false" if magnitude is not None else "has no DoRA magnitude"
        raise AdapterError(f"{weights}: module {name!r} {problem}")
    bias = found.get("lora_B.bias")
    if bias is not None and not config.lora_bias:
        raise AdapterError(f"{weights}: module {name!r} has a lora_B bias, but lora_bias is false")
    unknown = set(found) - {a_key, b_key, "lora_magnitude_vector", "lora_B.bias"}
    if unknown:
        raise AdapterError(f"{weights}: module {name!r}: unexpected {sorted(unknown)[0]} beside {a_key}")
    return LoraModule(name, a, b, config.scaling_of(name), embedding, magnitude, bias)


def load_lora_adapter(path: Path) -> LoraAdapter:
    config = read_peft_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLED_FILE).is_file():
            raise AdapterError(f"{path / PICKLED_FILE}: a pickle, which is never loaded (unpickling runs code); "
                               "save the adapter with safe_serialization=True")
        raise AdapterError(f"{weights}: missing (only safetensors adapters are supported)")
    parts, replacements = _sort_tensors(weights)
    if not parts and not replacements:
        raise AdapterError(f"{weights}: no LoRA tensors")
    modules = tuple(_module(name, found, config, weights) for name, found in sorted(parts.items()))
    return LoraAdapter(path, config, modules, tuple(replacements))

