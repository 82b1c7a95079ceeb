"""Split a GGUF into a llama.cpp split set, as `gguf-split --split --split-max-size N` does.

The pinned llama.cpp (tools/gguf-split/gguf-split.cpp, MODE_SIZE) is the reference:

- tensors keep their input order; a split's size counts only GGML_PAD(nbytes, 32) of its tensors
  (metadata is not counted), and a new split starts when the next tensor would take it over the limit;
- the first split carries every KV pair of the source, then split.no (u16), split.tensors.count (i32)
  and split.count (u16); every other split carries only those three keys. (gguf_set_kv, then
  gguf_set_val_*, which remove a key before appending it: split.count is set twice, a placeholder
  before the plan is known and the count after it, so it ends up last);
- parts are named by llama_split_path: PREFIX-00001-of-00003.gguf.

llama.cpp loads such a set from its first part and finds the others beside it by that naming.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import BuildError, ModelError, UsageError

if TYPE_CHECKING:
    from gguf import GGUFReader

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # gguf_init_empty(): what gguf-split writes, whatever the input's version
GGUF_DEFAULT_ALIGNMENT = 32
KEY_ALIGNMENT = "general.alignment"
KEY_SPLIT_NO = "split.no"
KEY_SPLIT_COUNT = "split.count"
KEY_SPLIT_TENSORS_COUNT = "split.tensors.count"
SPLIT_KEYS = (KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS_COUNT)
MAX_SPLITS = 0xFFFF  # split.count is a u16
GGML_MAX_DIMS = 4

_GGUF_TYPE_UINT16 = 2
_GGUF_TYPE_INT32 = 5
_COPY_CHUNK = 16 << 20  # memory for tensor data is bounded by this, not by the model


def split_path(prefix: Path | str, index: int, count: int) -> Path:
    """llama_split_path: the name of split `index` (0-based) of `count`, e.g. PREFIX-00001-of-00003.gguf."""
    return Path(f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf")


def split_prefix(path: Path | str, index: int, count: int) -> Path | None:
    """llama_split_prefix: PREFIX if `path` is named as split `index` of `count`, else None."""
    text, postfix = str(path), f"-{index + 1:05d}-of-{count:05d}.gguf"
    if len(text) <= len(postfix) or not text.endswith(postfix):
        return None
    return Path(text[: -len(postfix)])


def ggml_pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class _Tensor:
    name: str
    ne: tuple[int, ...]  # ggml order (fastest-varying first), as the source stores it
    ggml_type: int
    n_bytes: int
    source_offset: int  # where its data starts in the source file


def plan_splits(sizes: Sequence[int], max_bytes: int) -> list[range]:
    """gguf-split's MODE_SIZE rule over padded tensor sizes: the tensor indices of each split.

    Callers refuse a tensor larger than max_bytes first; gguf-split aborts on that only when it is
    the first tensor ("one of splits have 0 tensors") and otherwise gives it an oversized split.
    """
    starts = [0]
    current = 0
    for i, size in enumerate(sizes):
        if current + size > max_bytes and i > starts[-1]:
            starts.append(i)
            current = 0
        current += size
    return [range(a, b) for a, b in zip(starts, [*starts[1:], len(sizes)], strict=True)]


def split_gguf(source: Path, out_dir: Path, stem: str, max_bytes: int) -> list[Path]:
    """Write `source` as a split set out_dir/STEM-0000i-of-0000n.gguf whose splits hold at most max_bytes of tensors.

    Returns the parts, first first; a source of at most max_bytes, or whose tensors fit one split,
    is not split and comes back as [source]. Nothing is left in out_dir if this fails.
    """
    if max_bytes <= 0:
        raise UsageError(f"split size must be positive, got {max_bytes} bytes")
    if not stem or "/" in stem or stem in (".", ".."):
        raise UsageError(f"split name {stem!r}: must be a plain file name stem")
    try:
        if source.stat().st_size <= max_bytes:
            return [source]
    except OSError as e:
        raise ModelError(f"{source}: not a readable GGUF file ({e.strerror or e})") from e
    reader = _open_source(source)
    tensors = _source_tensors(source, reader)
    _refuse_oversized(source, tensors, max_bytes)
    plan = plan_splits([ggml_pad(t.n_bytes, GGUF_DEFAULT_ALIGNMENT) for t in tensors], max_bytes)
    if len(plan) == 1:
        return [source]  # a 00001-of-00001 would hold the same tensors; its metadata is not counted either way
    if len(plan) > MAX_SPLITS:
        raise UsageError(f"{source}: splitting at {max_bytes} bytes needs {len(plan)} parts, "
                         f"more than the {MAX_SPLITS} a GGUF split set can have")
    kv = _source_kv(reader)
    alignment = int(reader.alignment)
    paths = [split_path(out_dir / stem, i, len(plan)) for i in range(len(plan))]
    written: list[Path] = []
    try:
        with open(source, "rb") as src:
            for i, (path, indices) in enumerate(zip(paths, plan, strict=True)):
                # Only the first split carries the source's KV pairs, general.alignment among them:
                # every other split is read, and so must be written, with the default alignment.
                first = i == 0
                with open(path, "xb") as out:  # "x": never over a file this call did not create
                    written.append(path)
                    _write_split(src, out, _split_header(kv if first else [], i, len(plan), len(tensors)),
                                 [tensors[j] for j in indices], alignment if first else GGUF_DEFAULT_ALIGNMENT)
    except BaseException as e:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise BuildError(f"{out_dir / stem}: writing the split set failed ({_os_error_text(e)})") from e
        raise
    return paths


def _open_source(source: Path) -> GGUFReader:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(source)
    except (OSError, ValueError) as e:
        raise ModelError(f"{source}: not a readable GGUF file ({e})") from e
    if reader.byte_order != "I" or sys.byteorder != "little":
        raise ModelError(f"{source}: only little-endian GGUF files can be split")
    count = reader.fields.get(KEY_SPLIT_COUNT)
    if count is not None and int(count.contents() or 0) > 1:
        raise UsageError(f"{source}: already one part of a {int(count.contents())}-part split set")
    return reader


def _source_tensors(source: Path, reader: GGUFReader) -> list[_Tensor]:
    tensors = [_Tensor(name=t.name, ne=tuple(int(d) for d in t.shape), ggml_type=int(t.tensor_type),
                       n_bytes=int(t.n_bytes), source_offset=int(t.data_offset)) for t in reader.tensors]
    for t in tensors:
        if len(t.ne) > GGML_MAX_DIMS:  # gguf.cpp refuses such a file; gguf-py before 0.20 reads it
            raise ModelError(f"{source}: tensor {t.name} has {len(t.ne)} dimensions, more than {GGML_MAX_DIMS}")
    return tensors


def _refuse_oversized(source: Path, tensors: Sequence[_Tensor], max_bytes: int) -> None:
    for t in tensors:
        if ggml_pad(t.n_bytes, GGUF_DEFAULT_ALIGNMENT) > max_bytes:
            raise UsageError(f"quantize.split_max_size: {max_bytes} bytes is less than tensor {t.name} of "
                             f"{source.name} ({ggml_pad(t.n_bytes, GGUF_DEFAULT_ALIGNMENT)} bytes): no split can "
                             "hold it")


def _source_kv(reader: GGUFReader) -> list[bytes]:
    """The source's KV pairs, each exactly as encoded in the file, in file order.

    Split keys the source already has (a merged file keeps split.count = 0) are dropped: gguf-split
    sets them again, which moves them to the end.
    """
    return [b"".join(part.tobytes() for part in field.parts)
            for name, field in reader.fields.items()
            if not name.startswith("GGUF.") and name not in SPLIT_KEYS]  # GGUF.*: the reader's header pseudo-fields


def _gguf_str(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _split_header(kv: list[bytes], index: int, count: int, n_tensors: int) -> list[bytes]:
    # split.count comes last: gguf-split first sets a placeholder, then sets it again once the count
    # is known, and gguf_set_val_* removes a key before appending it.
    return [*kv,
            _gguf_str(KEY_SPLIT_NO) + struct.pack("<IH", _GGUF_TYPE_UINT16, index),
            _gguf_str(KEY_SPLIT_TENSORS_COUNT) + struct.pack("<Ii", _GGUF_TYPE_INT32, n_tensors),
            _gguf_str(KEY_SPLIT_COUNT) + struct.pack("<IH", _GGUF_TYPE_UINT16, count)]


def _tensor_info(t: _Tensor, offset: int) -> bytes:
    # gguf.cpp writes ggml_n_dims(t): trailing dimensions of 1 are dropped, at least one is kept.
    ne = [*t.ne, *[1] * (GGML_MAX_DIMS - len(t.ne))]
    n_dims = next((i + 1 for i in range(GGML_MAX_DIMS - 1, 0, -1) if ne[i] > 1), 1)
    return (_gguf_str(t.name) + struct.pack("<I", n_dims) + struct.pack(f"<{n_dims}q", *ne[:n_dims])
            + struct.pack("<IQ", t.ggml_type, offset))


def _write_split(src: BinaryIO, out: BinaryIO, kv: list[bytes], tensors: Sequence[_Tensor], alignment: int) -> None:
    """One split, laid out as gguf_write_out does: header, KV, tensor infos, padding, padded tensor data."""
    infos, offset = [], 0
    for t in tensors:
        infos.append(_tensor_info(t, offset))
        offset += ggml_pad(t.n_bytes, alignment)
    meta = b"".join([GGUF_MAGIC, struct.pack("<Iqq", GGUF_VERSION, len(tensors), len(kv)), *kv, *infos])
    out.write(meta + bytes(ggml_pad(len(meta), alignment) - len(meta)))
    for t in tensors:
        _copy_range(src, out, t.source_offset, t.n_bytes)
        out.write(bytes(ggml_pad(t.n_bytes, alignment) - t.n_bytes))


def _os_error_text(e: OSError) -> str:
    return f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e.strerror or e)


def _copy_range(src: BinaryIO, out: BinaryIO, offset: int, length: int) -> None:
    src.seek(offset)
    while length > 0:
        chunk = src.read(min(_COPY_CHUNK, length))
        if not chunk:
            raise OSError(f"source ends {length} bytes before the end of a tensor")
        out.write(chunk)
        length -= len(chunk)
