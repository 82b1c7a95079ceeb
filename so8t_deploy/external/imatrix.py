"""Read llama.cpp importance-matrix files (GGUF `.in_sum2`/`.counts`, or the legacy .dat).

The result is what llama.cpp's quantize tool hands to `llama_model_quantize`: per tensor,
the mean squared activation of each input column.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import UsageError


def load_imatrix(path: Path) -> dict[str, list[float]]:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UsageError(f"{path}: cannot read importance matrix: {e.strerror}") from e
    entries = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    if not entries:
        raise UsageError(f"{path}: importance matrix has no entries")
    return entries


def _load_gguf(path: Path) -> dict[str, list[float]]:
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    entries = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(f"{base}.counts")
        if counts is None:
            raise UsageError(f"{path}: {base}.in_sum2 has no matching .counts")
        values, count_values = sums.data.reshape(-1), counts.data.reshape(-1)
        width = len(values) // len(count_values)
        mean: list[float] = []
        for j, count in enumerate(count_values):
            chunk = values[j * width:(j + 1) * width]
            mean.extend((chunk / count).tolist() if count > 0 else [1.0] * width)
        entries[base] = mean
    return entries


def _load_legacy(path: Path) -> dict[str, list[float]]:
    data = path.read_bytes()
    try:
        (n_entries,), offset = struct.unpack_from("<i", data), 4
        if n_entries < 1:
            raise UsageError(f"{path}: not an importance matrix (no entries)")
        entries = {}
        for _ in range(n_entries):
            (length,) = struct.unpack_from("<i", data, offset)
            name = data[offset + 4:offset + 4 + length].decode()
            offset += 4 + length
            ncall, nval = struct.unpack_from("<ii", data, offset)
            offset += 8
            values = struct.unpack_from(f"<{nval}f", data, offset)
            offset += 4 * nval
            # legacy files store (sum / count) * ncall; dividing by ncall gives the mean
            entries[name] = [v / ncall for v in values] if ncall > 0 else list(values)
    except (struct.error, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a valid importance matrix ({e})") from e
    return entries


def write_legacy_imatrix(path: Path, entries: dict[str, list[float]], ncall: int = 1) -> None:
    """Write the legacy format (used by tests and for hand-made matrices)."""
    out = bytearray(struct.pack("<i", len(entries)))
    for name, values in entries.items():
        encoded = name.encode()
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, len(values))
        out += struct.pack(f"<{len(values)}f", *(v * ncall for v in values))
    path.write_bytes(bytes(out))
