"""Streaming safetensors IO: validated headers, tensor-at-a-time reads, header-first writes.

A safetensors file is an 8-byte little-endian header length, a JSON header that maps each
tensor to its dtype, shape and [start, end) byte range, then the data. Because the header
fully describes the data, a writer that knows every output tensor's dtype and shape can
emit the header first and then stream tensors one by one; untouched tensors are read from
their file straight into the output's write buffers, without ever becoming Python objects.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidInputError, ModelError
from .append_file import AppendFile
from .phases import PhaseTimes

# safetensors dtype names <-> torch dtypes and element sizes
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
TORCH_TO_SAFETENSORS = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first data byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: Path, error: type[InvalidInputError] = ModelError) -> ShardHeader:
    """Parse and sanity-check a safetensors header; a truncated or corrupt file raises `error`."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise error(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise error(f"{path}: truncated or corrupt safetensors file (header length {header_len})")
            raw = json.loads(f.read(header_len))
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(raw, dict):
        raise error(f"{path}: corrupt safetensors header")
    data_start = 8 + header_len
    metadata = raw.pop("__metadata__", None) or {}
    tensors: dict[str, TensorEntry] = {}
    data_end = data_start
    for name, info in raw.items():
        try:
            dtype, shape = info["dtype"], tuple(_integer(n) for n in info["shape"])
            begin, end = (_integer(n) for n in info["data_offsets"])
            _, itemsize = DTYPES[dtype]
        except (KeyError, TypeError, ValueError) as e:
            raise error(f"{path}: tensor {name!r} has an invalid header entry") from e
        if any(n <= 0 for n in shape):
            # Negative sizes can multiply to a plausible byte count; an empty weight poisons the GGUF.
            raise error(f"{path}: tensor {name!r} has shape {list(shape)}: every dimension must be at least 1")
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise error(f"{path}: tensor {name!r} has inconsistent offsets")
        tensors[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
        data_end = max(data_end, data_start + end)
    if data_end > size:
        raise error(f"{path}: truncated safetensors file ({size} bytes, header promises {data_end})")
    return ShardHeader(path, tensors, metadata)


def _integer(value: object) -> int:
    """A JSON integer as such: 2.5, "2" and true are not sizes."""
    if type(value) is not int:
        raise TypeError(f"not an integer: {value!r}")
    return value


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def map_range(fd: int, offset: int, nbytes: int) -> torch.Tensor:
    """Map bytes [offset, offset + nbytes) of an open file as a uint8 tensor, without copying.

    The mapping is private to this tensor and lives only as long as it does, so resident
    memory holds one tensor's pages at a time rather than the whole shard, as a map of the
    whole file (safe_open) would.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fd, nbytes + offset - aligned, offset=aligned, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapping, dtype=torch.uint8, offset=offset - aligned, count=nbytes)


def byte_view(data: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU uint8 tensor as a memoryview, without copying (for writes and hashing)."""
    # memoryview(ndarray) is the same view, but numpy's stubs declare the buffer protocol only on Python 3.12+.
    return data.numpy().data


def nonfinite_at(data: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> str | None:
    """Where a tensor's raw bytes hold their first NaN or infinity ("NaN at [3, 17]"); None if all are finite.

    One read at memory speed and no temporary: min and max propagate NaN and keep any infinity,
    so a finite min and max prove every element finite (isfinite() would write a bool per element).
    Only a tensor that fails is searched for the index. Integer tensors are finite by nature.
    """
    if dtype not in FLOAT_DTYPES or data.numel() == 0:
        return None
    values = data.view(DTYPES[dtype][0])
    low, high = (float(v) for v in torch.aminmax(values))
    if math.isfinite(low) and math.isfinite(high):
        return None
    flat = int(torch.nonzero(~torch.isfinite(values))[0])
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), shape)]
    return f"{'NaN' if math.isnan(float(values[flat])) else 'infinity'} at {index}"


def read_range(fd: int, offset: int, nbytes: int) -> torch.Tensor:
    """Read bytes [offset, offset + nbytes) of an open file into a new uint8 tensor.

    Plain reads rather than a memory map: mapped file pages would count towards the
    process's resident memory for as long as the mapping lives, i.e. the whole shard.
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    view = byte_view(buffer).cast("B")
    filled = 0
    while filled < nbytes:
        n = os.preadv(fd, [view[filled:]], offset + filled)
        if n == 0:
            raise ModelError(f"file descriptor {fd}: unexpected end of file at byte {offset + filled}")
        filled += n
    return buffer


class ShardWriter:
    """Writes one safetensors file whose tensor list is fixed up front, in that order.

    Tensors arrive as in-memory parts (`write`) or as byte ranges of a source file (`copy_range`,
    read straight into the output's buffers). The bytes go to disk past the page cache where the
    file system allows it (see append_file.py), so the disk works while the bake still folds.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str] | None = None,
                 times: PhaseTimes | None = None):
        self.path = path
        self._expected = [t.name for t in tensors]
        self._by_name = {t.name: t for t in tensors}
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        self._file = AppendFile(path, times)
        self._next = 0
        self._file.write(memoryview(struct.pack("<Q", len(encoded)) + encoded))

    def write(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write the next tensor from one or more contiguous pieces (e.g. row chunks) of the header's dtype."""
        spec = self._begin(name)
        written = 0
        for part in parts:
            if part.dtype != torch.uint8 and TORCH_TO_SAFETENSORS[part.dtype] != spec.dtype:
                raise RuntimeError(f"{name}: produced {part.dtype}, header says {spec.dtype}")
            if not part.is_contiguous():
                raise RuntimeError(f"{name}: a part that is not contiguous")
            data = part.reshape(-1).view(torch.uint8)
            self._file.write(byte_view(data))
            written += data.numel()
        if written != spec.nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, header says {spec.nbytes}")

    def copy_range(self, name: str, source_fd: int, offset: int, nbytes: int) -> None:
        """Write the next tensor as bytes [offset, offset + nbytes) of an open file, unchanged."""
        spec = self._begin(name)
        if nbytes != spec.nbytes:
            raise RuntimeError(f"{name}: copying {nbytes} bytes, header says {spec.nbytes}")
        self._file.copy_from(source_fd, offset, nbytes)

    def _begin(self, name: str) -> OutputTensor:
        if self._next >= len(self._expected) or self._expected[self._next] != name:
            raise RuntimeError(f"{self.path}: tensor {name!r} written out of order")
        self._next += 1
        return self._by_name[name]

    def abandon(self) -> None:
        """Close the file without finishing it (a failed bake; its staging directory is removed)."""
        self._file.abandon()

    def close(self) -> None:
        """Finish the file: every tensor written, the bytes on disk (fsynced)."""
        if self._next != len(self._expected):
            self._file.abandon()
            raise RuntimeError(f"{self.path}: {len(self._expected) - self._next} tensors were never written")
        self._file.close()
