"""What a GGUF file says about itself: architecture, file type, size, bits per weight, provenance.

A split set (llama.cpp's gguf-split, see gguf_split.py) is read from its first part, as llama.cpp
loads it: the other parts are found beside it by their names and counted in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError
from .gguf_split import KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS_COUNT, split_path, split_prefix

if TYPE_CHECKING:
    from gguf import GGUFReader


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


def read_gguf_info(path: Path) -> GgufInfo:
    """The model in `path`: a single GGUF, or the first part of a split set (then all its parts, summed)."""
    reader = _open(path)
    strings, ints = _scalars(reader)
    parts = _split_parts(path, ints)
    n_params, tensor_bytes, n_tensors = _tensor_totals(reader)
    for index, part in enumerate(parts[1:], start=1):
        part_params, part_bytes, part_tensors = _tensor_totals(_open_part(part, index, len(parts)))
        n_params, tensor_bytes, n_tensors = n_params + part_params, tensor_bytes + part_bytes, n_tensors + part_tensors
    expected = ints.get(KEY_SPLIT_TENSORS_COUNT, n_tensors)
    if len(parts) > 1 and n_tensors != expected:  # llama.cpp refuses such a set too ("corrupted model")
        raise ModelError(f"{path}: split set holds {n_tensors} tensors, its first part says {expected}")
    return GgufInfo(
        path=path,
        architecture=strings.get("general.architecture"),
        file_type=ints.get("general.file_type"),
        n_params=n_params,
        tensor_bytes=tensor_bytes,
        metadata={k: v for k, v in strings.items() if k.startswith("so8t.")},
        parts=parts,
    )


def _open(path: Path) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from e


def _scalars(reader: GGUFReader) -> tuple[dict[str, str], dict[str, int]]:
    from gguf import GGUFValueType

    strings: dict[str, str] = {}
    ints: dict[str, int] = {}
    for name, f in reader.fields.items():
        if not f.types or f.types[0] == GGUFValueType.ARRAY:
            continue
        value = f.contents()
        if isinstance(value, str):
            strings[name] = value
        elif isinstance(value, int):
            ints[name] = value
    return strings, ints


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


def _open_part(part: Path, index: int, count: int) -> GGUFReader:
    """Part `index` of a split set, refused unless it says it is that part of a set of that size."""
    if not part.is_file():
        raise ModelError(f"{part}: part {index + 1} of a {count}-part split GGUF is missing")
    reader = _open(part)
    _, ints = _scalars(reader)
    found = (ints.get(KEY_SPLIT_NO), ints.get(KEY_SPLIT_COUNT))
    if found != (index, count):
        said = "no split keys" if found == (None, None) else f"split.no={found[0]}, split.count={found[1]}"
        raise ModelError(f"{part}: expected part {index + 1} of a {count}-part split GGUF "
                         f"(split.no={index}, split.count={count}), found {said}")
    return reader


def _tensor_totals(reader: GGUFReader) -> tuple[int, int, int]:
    """Parameters, tensor bytes and tensors in one file."""
    return (sum(int(t.n_elements) for t in reader.tensors), sum(int(t.n_bytes) for t in reader.tensors),
            len(reader.tensors))
