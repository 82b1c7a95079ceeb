"""What a GGUF file says about itself: architecture, file type, size, bits per weight, provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    architecture: str | None
    file_type: int | None
    n_params: int
    tensor_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)  # string-valued keys, e.g. so8t.*

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.n_params if self.n_params else 0.0


def read_gguf_info(path: Path) -> GgufInfo:
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from e
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
    return GgufInfo(
        path=path,
        architecture=strings.get("general.architecture"),
        file_type=ints.get("general.file_type"),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        metadata={k: v for k, v in strings.items() if k.startswith("so8t.")},
    )
