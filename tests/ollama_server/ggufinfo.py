"""A GGUF's metadata, read the way Ollama's fs/ggml Decode reads it (without loading the model)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

# GGUF file types by llama_ftype number, named as Ollama's fs/ggml FileType.String().
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
              26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
              36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0"}


# --- GGUF metadata (fs/ggml Decode) ---------------------------------------------------------------------

class GGUFError(Exception):
    pass


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


@dataclass
class GGUFInfo:
    """What Ollama reads from a GGUF without loading it: key/values (arrays left out, as its non-verbose decode
    does: null, or [] when empty), tensor infos, and the parameter count it adds."""

    kv: dict
    tensors: list[dict]
    data_offset: int

    @property
    def architecture(self) -> str:
        return str(self.kv.get("general.architecture") or "")

    @property
    def file_type(self) -> str:
        return FILE_TYPES.get(self.kv.get("general.file_type"), "unknown")

    @property
    def parameter_count(self) -> int:
        return int(self.kv["general.parameter_count"])

    def has_compatibility_tensors(self) -> bool:
        """Vision/audio/MTP tensors that Ollama keeps in place instead of rewriting the GGUF."""
        return any(t["name"].startswith(("a.", "mm.", "mtp.", "s.", "v.")) for t in self.tensors)


class _Reader:
    def __init__(self, f):
        self.f = f

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) < n:
            raise GGUFError("unexpected EOF")
        return data

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.scalar("<Q")).decode("utf-8", "replace")

    def value(self, kind: int) -> object:
        if kind == 8:
            return self.string()
        if kind == 9:
            return self.array()
        if kind not in _GGUF_SCALARS:
            raise GGUFError(f"invalid type: {kind}")
        value = self.scalar(_GGUF_SCALARS[kind])
        return _float32(value) if kind == 6 else value

    def array(self) -> list | None:
        kind, count = self.scalar("<I"), self.scalar("<Q")
        if kind == 8:
            for _ in range(count):
                self.read(self.scalar("<Q"))
        elif kind in _GGUF_SCALARS:
            self.f.seek(count * struct.calcsize(_GGUF_SCALARS[kind]), os.SEEK_CUR)
        else:
            raise GGUFError(f"invalid array type: {kind}")
        return [] if count == 0 else None


def _float32(value: float) -> float:
    """A float32 as Go prints it: the shortest decimal that reads back as the same float32."""
    import numpy as np

    return float(str(np.float32(value)))


def read_gguf(path: Path) -> GGUFInfo:
    """Decode a GGUF's header like Ollama (every tensor must lie inside the file)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as f:
        r = _Reader(f)
        if r.read(4) != b"GGUF":
            raise GGUFError("invalid file magic")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        kv = {}
        for _ in range(n_kv):
            key = r.string()
            kv[key] = r.value(r.scalar("<I"))
        tensors, parameters = [], 0
        for _ in range(n_tensors):
            name = r.string()
            shape = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
            kind, offset = r.scalar("<I"), r.scalar("<Q")
            if kind not in GGML_QUANT_SIZES:
                raise GGUFError(f"tensor {name!r} has unknown type {kind}")
            elements = 1
            for dim in shape:
                elements *= dim
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            tensors.append({"name": name, "type": GGMLQuantizationType(kind).name, "shape": shape,
                            "offset": offset, "nbytes": elements // block * size})
            parameters += elements
        kv["general.parameter_count"] = parameters
        alignment = int(kv.get("general.alignment") or 32)
        data_offset = -(-f.tell() // alignment) * alignment
        file_size = f.seek(0, os.SEEK_END)
    for t in tensors:
        end = data_offset + t["offset"] + t["nbytes"]
        if end > file_size:
            raise GGUFError(f'tensor "{t["name"]}" offset+size ({end}) exceeds file size ({file_size})')
    return GGUFInfo(kv, tensors, data_offset)


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber, used for details.parameter_size."""
    for unit, size, digits in (("B", 10**9, 1), ("M", 10**6, 2)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{digits}f}{unit}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)
