"""Read and write llama.cpp importance-matrix files (GGUF `.in_sum2`/`.counts`, or the legacy .dat).

What `load_imatrix` returns is what llama.cpp's quantize tool hands to `llama_model_quantize`: per tensor,
the mean squared activation of each input column. `write_imatrix` writes the GGUF form as llama-imatrix's
`save_imatrix` does; `read_imatrix_info` reads what a file says about itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:  # numpy and gguf are imported where they are used
    import numpy as np

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


@dataclass(frozen=True)
class ImatrixInfo:
    entries: int  # tensors with statistics
    chunks: int  # chunks of calibration text they were computed over
    chunk_size: int  # tokens per chunk; 0 where the file does not say (legacy files)
    datasets: tuple[str, ...]  # the calibration texts, as whoever computed it named them


def load_imatrix(path: Path) -> dict[str, list[float]]:
    entries = _load_gguf(path) if _is_gguf(path) else _load_legacy(path)
    if not entries:
        raise UsageError(f"{path}: importance matrix has no entries")
    return entries


def read_imatrix_info(path: Path) -> ImatrixInfo:
    """Entries, chunks, chunk size and datasets, as llama.cpp's common_imatrix_load reads them."""
    if _is_gguf(path):
        info = _gguf_info(path)
    else:
        records, trailer = _parse_legacy(path)
        # ncall is the chunk count each entry was computed over; the tool appends the run's own when it can
        chunks = trailer[0] if trailer else max(ncall for _, ncall, _ in records)
        info = ImatrixInfo(len(records), chunks, 0, (trailer[1],) if trailer and trailer[1] else ())
    if info.entries == 0:
        raise UsageError(f"{path}: importance matrix has no entries")
    return info


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise UsageError(f"{path}: cannot read importance matrix: {e.strerror}") from e


def _gguf_tensors(path: Path) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """The reader and, per entry name, its (in_sum2, counts) tensors; an unpaired tensor is refused."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:  # gguf's ways of saying "not a valid file"
        raise UsageError(f"{path}: not a valid GGUF importance matrix ({e})") from e
    tensors = {t.name: t for t in reader.tensors}
    pairs = {}
    for name, sums in tensors.items():
        if not name.endswith(SUMS_SUFFIX):
            continue
        base = name.removesuffix(SUMS_SUFFIX)
        counts = tensors.get(f"{base}{COUNTS_SUFFIX}")
        if counts is None:
            raise UsageError(f"{path}: {base}{SUMS_SUFFIX} has no matching {COUNTS_SUFFIX}")
        pairs[base] = (sums, counts)
    return reader, pairs


def _load_gguf(path: Path) -> dict[str, list[float]]:
    entries = {}
    for base, (sums, counts) in _gguf_tensors(path)[1].items():
        values, count_values = sums.data.reshape(-1), counts.data.reshape(-1)
        width = len(values) // len(count_values)
        mean: list[float] = []
        for j, count in enumerate(count_values):
            chunk = values[j * width:(j + 1) * width]
            mean.extend((chunk / count).tolist() if count > 0 else [1.0] * width)
        entries[base] = mean
    return entries


def _gguf_info(path: Path) -> ImatrixInfo:
    reader, pairs = _gguf_tensors(path)
    try:
        # a key that is absent reads as 0 / no datasets, as llama.cpp's loader has it
        datasets = reader.fields[KEY_DATASETS].contents() if KEY_DATASETS in reader.fields else []
        counts = [int(reader.fields[k].contents()) if k in reader.fields else 0
                  for k in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)]
    except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: malformed importance-matrix metadata ({e})") from e
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise UsageError(f"{path}: {KEY_DATASETS} is not an array of strings")
    return ImatrixInfo(len(pairs), counts[0], counts[1], tuple(datasets))


def _parse_legacy(path: Path) -> tuple[list[tuple[str, int, tuple[float, ...]]], tuple[int, str] | None]:
    """The entries (name, ncall, stored values) and the optional trailer (chunk count, dataset)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read importance matrix: {e.strerror}") from e
    try:
        (n_entries,), offset = struct.unpack_from("<i", data), 4
        if n_entries < 1:
            raise UsageError(f"{path}: not an importance matrix (no entries)")
        records = []
        for _ in range(n_entries):
            (length,) = struct.unpack_from("<i", data, offset)
            name = data[offset + 4:offset + 4 + length].decode()
            offset += 4 + length
            ncall, nval = struct.unpack_from("<ii", data, offset)
            offset += 8
            records.append((name, ncall, struct.unpack_from(f"<{nval}f", data, offset)))
            offset += 4 * nval
    except (struct.error, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a valid importance matrix ({e})") from e
    return records, _legacy_trailer(data, offset)


def _legacy_trailer(data: bytes, offset: int) -> tuple[int, str] | None:
    """llama-imatrix appends the run's chunk count and its text file's name; both are optional."""
    try:
        (chunks,) = struct.unpack_from("<i", data, offset)
    except struct.error:
        return None
    try:
        (length,) = struct.unpack_from("<i", data, offset + 4)
        name = data[offset + 8:offset + 8 + length].decode() if length > 0 else ""
    except (struct.error, UnicodeDecodeError):
        name = ""
    return chunks, name


def _load_legacy(path: Path) -> dict[str, list[float]]:
    # legacy files store (sum / count) * ncall; dividing by ncall gives the mean
    return {name: [v / ncall for v in values] if ncall > 0 else list(values)
            for name, ncall, values in _parse_legacy(path)[0]}


def write_legacy_imatrix(path: Path, entries: dict[str, list[float]], ncall: int = 1) -> None:
    """Write the legacy format (used by tests and for hand-made matrices)."""
    out = bytearray(struct.pack("<i", len(entries)))
    for name, values in entries.items():
        encoded = name.encode()
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, len(values))
        out += struct.pack(f"<{len(values)}f", *(v * ncall for v in values))
    path.write_bytes(bytes(out))


def write_imatrix(path: Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray], *,
                  datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    """Write a GGUF importance matrix as llama-imatrix's save_imatrix does.

    sums[name] has shape (nmat, ne0): per matrix, the sum of squared activations of each input column;
    counts[name] has shape (nmat,): the rows summed. Entries are written in name order as
    `<name>.in_sum2` (F32, ggml shape [ne0, nmat]) and `<name>.counts` (F32, [1, nmat]).
    """
    import numpy as np
    from gguf import GGUFWriter

    if sums.keys() != counts.keys():
        raise ValueError("write_imatrix: sums and counts name different tensors")
    if not datasets:  # gguf's writer drops an empty array, where save_imatrix writes one
        raise ValueError("write_imatrix: at least one dataset is needed")
    writer = GGUFWriter(path, arch="")
    # save_imatrix writes no general.architecture; GGUFWriter adds one unasked
    writer.kv_data[0].pop("general.architecture", None)
    writer.add_type("imatrix")
    writer.add_array(KEY_DATASETS, list(datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, chunk_count)
    writer.add_uint32(KEY_CHUNK_SIZE, chunk_size)
    for name in sorted(sums, key=str.encode):  # std::sort on std::string: byte order
        values = np.asarray(sums[name], dtype=np.float32)
        count_values = np.asarray(counts[name], dtype=np.float32)
        if values.ndim != 2 or count_values.shape != (values.shape[0],):
            raise ValueError(f"write_imatrix: {name}: sums {values.shape} and counts {count_values.shape} "
                             "are not (nmat, ne0) and (nmat,)")
        writer.add_tensor(f"{name}{SUMS_SUFFIX}", _ggml_dims(values))
        writer.add_tensor(f"{name}{COUNTS_SUFFIX}", _ggml_dims(count_values.reshape(-1, 1)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _ggml_dims(array: np.ndarray) -> np.ndarray:
    """The array as gguf_write_to_file describes it: ggml_n_dims drops trailing (ggml order) sizes of 1."""
    shape = list(array.shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return array.reshape(shape)
