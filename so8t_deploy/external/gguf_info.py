"""What a GGUF file says about itself: architecture, file type, size, bits per weight, provenance.

Only the header is read: the key/values, skipping arrays (a vocabulary of 128k tokens and 280k merges is
skipped in milliseconds, where gguf's GGUFReader, which builds a view of every element, takes seconds), and
the tensor infos, each checked to lie inside the file. A split set (llama.cpp's gguf-split, see gguf_split.py)
is read from its first part, as llama.cpp loads it: the other parts are found beside it by their names and
counted in.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from .gguf_split import KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS_COUNT, split_path, split_prefix

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # llama.cpp reads no other (version 1 had 32-bit lengths)
DEFAULT_ALIGNMENT = 32
# GGUF value types (gguf's GGUFValueType) that hold one number: their struct format.
_NUMBERS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    architecture: str | None
    file_type: int | None
    n_params: int
    tensor_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)  # string-valued keys, e.g. so8t.*
    parts: tuple[Path, ...] = ()  # every file of the model, first first: (path,) unless it is a split set

    def __post_init__(self) -> None:
        if not self.parts:
            object.__setattr__(self, "parts", (self.path,))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.n_params if self.n_params else 0.0


@dataclass(frozen=True)
class _Header:
    """One GGUF file's scalar key/values and tensor totals."""

    strings: dict[str, str]
    ints: dict[str, int]
    n_params: int
    tensor_bytes: int
    n_tensors: int


def read_gguf_info(path: Path) -> GgufInfo:
    """The model in `path`: a single GGUF, or the first part of a split set (then all its parts, summed)."""
    header = _read_header(path)
    parts = _split_parts(path, header.ints)
    n_params, tensor_bytes, n_tensors = header.n_params, header.tensor_bytes, header.n_tensors
    for index, part in enumerate(parts[1:], start=1):
        part_header = _open_part(part, index, len(parts))
        n_params += part_header.n_params
        tensor_bytes += part_header.tensor_bytes
        n_tensors += part_header.n_tensors
    expected = header.ints.get(KEY_SPLIT_TENSORS_COUNT, n_tensors)
    if len(parts) > 1 and n_tensors != expected:  # llama.cpp refuses such a set too ("corrupted model")
        raise ModelError(f"{path}: split set holds {n_tensors} tensors, its first part says {expected}")
    return GgufInfo(
        path=path,
        architecture=header.strings.get("general.architecture"),
        file_type=header.ints.get("general.file_type"),
        n_params=n_params,
        tensor_bytes=tensor_bytes,
        metadata={k: v for k, v in header.strings.items() if k.startswith("so8t.")},
        parts=parts,
    )


def _split_parts(path: Path, ints: dict[str, int]) -> tuple[Path, ...]:
    """All files of the model whose first (or only) file is `path`, found as llama.cpp finds them."""
    count = ints.get(KEY_SPLIT_COUNT, 0)
    if count <= 1:  # 0: a merged set (gguf-split --merge), 1: a set of one
        return (path,)
    index = ints.get(KEY_SPLIT_NO, 0)
    if index != 0:
        raise ModelError(f"{path}: part {index + 1} of a {count}-part split GGUF; open its first part instead")
    prefix = split_prefix(path, 0, count)
    if prefix is None:
        raise ModelError(f"{path}: first part of a {count}-part split GGUF, but not named "
                         f"{split_path('NAME', 0, count)}, so its other parts cannot be found")
    return tuple(split_path(prefix, i, count) for i in range(count))


def _open_part(part: Path, index: int, count: int) -> _Header:
    """Part `index` of a split set, refused unless it says it is that part of a set of that size."""
    if not part.is_file():
        raise ModelError(f"{part}: part {index + 1} of a {count}-part split GGUF is missing")
    header = _read_header(part)
    found = (header.ints.get(KEY_SPLIT_NO), header.ints.get(KEY_SPLIT_COUNT))
    if found != (index, count):
        said = "no split keys" if found == (None, None) else f"split.no={found[0]}, split.count={found[1]}"
        raise ModelError(f"{part}: expected part {index + 1} of a {count}-part split GGUF "
                         f"(split.no={index}, split.count={count}), found {said}")
    return header


def _read_header(path: Path) -> _Header:
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _HeaderParser(data).parse()
    except (OSError, ValueError) as e:  # mmap of an empty file is a ValueError
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from e
    except _Malformed as e:
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from None


class _Malformed(Exception):
    pass


class _HeaderParser:
    """GGUF's layout (ggml/docs/gguf.md): magic, version, tensor count, key/value count, the key/values, the
    tensor infos, then the tensor data at the next multiple of general.alignment."""

    def __init__(self, data: mmap.mmap):
        self.data, self.offset, self.order = data, 0, "<"

    def parse(self) -> _Header:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if self._take(4) != GGUF_MAGIC:
            raise _Malformed("no GGUF magic")
        version = self._uint("I")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order, self.offset = ">", 4
            version = self._uint("I")
        if version not in GGUF_VERSIONS:
            raise _Malformed(f"GGUF version {version}; llama.cpp reads {' and '.join(map(str, GGUF_VERSIONS))}")
        n_tensors, n_kv = self._uint("Q"), self._uint("Q")
        strings: dict[str, str] = {}
        ints: dict[str, int] = {}
        for _ in range(n_kv):
            key, kind = self._string(), self._uint("I")
            if kind == _STRING:
                strings[key] = self._string()
            elif kind in _NUMBERS:
                value = self._number(_NUMBERS[kind])
                if isinstance(value, int) and not isinstance(value, bool):
                    ints[key] = value
            else:
                self._skip_value(kind)
        alignment = ints.get("general.alignment", DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise _Malformed(f"general.alignment {alignment} is not a power of two")
        tensors: dict[str, tuple[int, int, int]] = {}  # name -> (elements, bytes, offset in the data)
        for _ in range(n_tensors):
            name, n_dims = self._string(), self._uint("I")
            elements = 1
            for _ in range(n_dims):
                elements *= self._uint("Q")
            type_id, data_offset = self._uint("I"), self._uint("Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            except (ValueError, KeyError):
                raise _Malformed(f"tensor {name!r} has unknown type {type_id}") from None
            if name in tensors:
                raise _Malformed(f"tensor {name!r} is listed twice")
            tensors[name] = (elements, elements * type_size // block, data_offset)
        data_start = -(-self.offset // alignment) * alignment
        for name, (_, size, data_offset) in tensors.items():
            if data_start + data_offset + size > len(self.data):
                raise _Malformed(f"tensor {name!r} ends past the end of the file (truncated?)")
        return _Header(strings=strings, ints=ints, n_params=sum(t[0] for t in tensors.values()),
                       tensor_bytes=sum(t[1] for t in tensors.values()), n_tensors=len(tensors))

    def _take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise _Malformed("the header ends past the end of the file (truncated?)")
        chunk = self.data[self.offset:end]
        self.offset = end
        return chunk

    def _uint(self, code: str) -> int:
        """An unsigned count, size or type id ("I": 32 bits, "Q": 64)."""
        return int(self._number(code))

    def _number(self, code: str) -> int | float | bool:
        fmt = self.order + code
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise _Malformed("the header ends past the end of the file (truncated?)")
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return value  # type: ignore[no-any-return]

    def _string(self) -> str:
        raw = self._take(self._uint("Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"a string at byte {self.offset - len(raw)} is not UTF-8") from None

    def _skip_value(self, kind: int) -> None:
        """Step over an array (its elements, or arrays of them), without building them."""
        if kind != _ARRAY:
            raise _Malformed(f"unknown value type {kind} at byte {self.offset - 4}")
        item_kind, count = self._uint("I"), self._uint("Q")
        if item_kind in _NUMBERS:
            self.offset += count * struct.calcsize(self.order + _NUMBERS[item_kind])
            if self.offset > len(self.data):
                raise _Malformed("the header ends past the end of the file (truncated?)")
        elif item_kind == _STRING:
            length, data, offset, end = struct.Struct(self.order + "Q"), self.data, self.offset, len(self.data)
            for _ in range(count):
                if offset + 8 > end:
                    raise _Malformed("the header ends past the end of the file (truncated?)")
                offset += 8 + length.unpack_from(data, offset)[0]
            if offset > end:
                raise _Malformed("the header ends past the end of the file (truncated?)")
            self.offset = offset
        else:
            for _ in range(count):
                self._skip_value(item_kind)
