"""Read a shard's tensors in file order on a background thread, hashing and checking them on the way.

Every byte of a source shard passes through here once: the header, each tensor, and any
padding. When the shard's identity is not known yet, feeding them to BLAKE3 in file order
yields it for the provenance file without reading the shard a second time. Each tensor the
output uses is also proven finite here, in the same pass: the hash and the finite check take
the same slice of the mapped tensor one after the other, while it is in the CPU cache. (A NaN
in a weight that no adapter touches still poisons the GGUF, and quantize would only fail much
later, with "code 1".)

Tensors are mapped, not read: a mapped page costs no copy, and the fold reads the same pages.
A tensor the output keeps byte for byte is not handed over as bytes at all, but as a file range
that the writer reads straight into its output buffers.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, cast

import blake3
import torch

from ..cancel import leave_interrupts_to_the_main_thread
from ..errors import ModelError
from ..store.hashing import BLAKE3, new_blake3
from .phases import PhaseTimes
from .safetensors_io import (
    DTYPES,
    FLOAT_DTYPES,
    OutputTensor,
    TensorEntry,
    byte_view,
    map_range,
    nonfinite_at,
    read_range,
)

T = TypeVar("T")
_DONE = object()
_SLICE = 4 << 20  # bytes hashed and checked together, so the check reads what the hash just brought into cache
class ExternalSource(Protocol):
    """Bytes of an output tensor that come from elsewhere than this shard (an adapter file, zeros)."""

    # Read-only: the sources are frozen dataclasses (Zeros) and properties (TensorRef).
    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self) -> torch.Tensor: ...


Source = TensorEntry | ExternalSource


@dataclass(frozen=True)
class FileRange:
    """Bytes of the shard that the output keeps unchanged (the writer copies them from its own descriptor)."""

    offset: int
    nbytes: int


@dataclass(frozen=True)
class SourceTensor:
    out: OutputTensor
    source: Source
    data: torch.Tensor | None  # the source's raw bytes, uint8 (mapped); None when only copied
    copy: FileRange | None = None  # set when the output keeps these bytes as they are


class ShardReader:
    """Yields each output tensor's source; tensors the output does not use are only hashed.

    `identity`: the shard's digest when already known (then nothing is hashed); else BLAKE3 is taken.
    `verbatim`: the output tensors that keep their source bytes: they come as file ranges.
    """

    def __init__(self, path: Path, items: list[tuple[OutputTensor, Source]], identity: str | None = None,
                 verbatim: frozenset[str] = frozenset(), times: PhaseTimes | None = None):
        self.path, self.items, self.verbatim = path, items, verbatim
        self.times = times or PhaseTimes()
        self._identity = identity

    @property
    def identity(self) -> str:
        """The shard's digest, `algorithm:hex`: known up front, or once every tensor has been read."""
        if self._identity is None:
            raise RuntimeError(f"{self.path}: digest asked for before the shard was read to the end")
        return self._identity

    def __iter__(self) -> Iterator[SourceTensor]:
        # One thread: the fold threads have the other cores, and this one's time shows as "hash".
        hasher = new_blake3(threads=1) if self._identity is None else None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            position = 0  # every byte before this one has been hashed and every tensor before it checked
            for out, entry in self.items:
                if not isinstance(entry, TensorEntry):
                    yield SourceTensor(out, entry, entry.read())
                    continue
                data = map_range(fd, entry.start, entry.nbytes)
                if entry.start >= position:  # not a second output from the same bytes (an untied lm_head)
                    if hasher is not None:
                        self._hash_gap(hasher, fd, position, entry.start)  # the header, padding, a replaced tensor
                    self._scan(entry, data, hasher)
                    position = entry.end
                if out.name in self.verbatim:
                    yield SourceTensor(out, entry, None, FileRange(entry.start, entry.nbytes))
                else:
                    yield SourceTensor(out, entry, data)
            if hasher is not None:
                self._hash_gap(hasher, fd, position, size)
                self._identity = f"{BLAKE3}:{hasher.hexdigest()}"
        finally:
            os.close(fd)

    def _scan(self, entry: TensorEntry, data: torch.Tensor, hasher: blake3.blake3 | None) -> None:
        """Hash (if asked) and check a tensor's bytes, one cache-sized slice at a time."""
        dtype = DTYPES[entry.dtype][0] if entry.dtype in FLOAT_DTYPES else None
        finite = True
        for offset in range(0, entry.nbytes, _SLICE):
            piece = data[offset:offset + _SLICE]
            if hasher is not None:
                with self.times.phase("hash"):
                    hasher.update(byte_view(piece))
            if dtype is not None and finite:
                with self.times.phase("check"):
                    low, high = (float(v) for v in torch.aminmax(piece.view(dtype)))
                finite = math.isfinite(low) and math.isfinite(high)  # min and max carry any NaN or infinity
        if not finite and (found := nonfinite_at(data, entry.dtype, entry.shape)):
            raise ModelError(f"{self.path}: tensor {entry.name!r} contains NaN or infinity (first: {found})")

    def _hash_gap(self, hasher: blake3.blake3, fd: int, start: int, stop: int) -> None:
        for offset in range(start, stop, _SLICE):
            with self.times.phase("read"):
                piece = read_range(fd, offset, min(_SLICE, stop - offset))
            with self.times.phase("hash"):
                hasher.update(byte_view(piece))


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` on a background thread, at most `depth` items ahead of the consumer."""
    buffer: queue.Queue[object] = queue.Queue(maxsize=depth)  # items, then _DONE or the exception
    stop = threading.Event()

    def produce() -> None:
        leave_interrupts_to_the_main_thread()
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            buffer.put(e)

    thread = threading.Thread(target=produce, name="so8t-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield cast(T, item)
    finally:
        stop.set()
        thread.join()
