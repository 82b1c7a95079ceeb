"""Read a shard's tensors in file order on a background thread, hashing and checking them on the way.

Every byte of a source shard passes through here exactly once: the header, each tensor,
and any padding. Feeding them to sha256 in file order yields the shard's digest for the
provenance file without reading it a second time, and the read-ahead thread keeps the
disk busy while the main thread folds the previous tensor. Each tensor the output uses is
also proven finite here, as it is read: a NaN in a weight that no adapter touches still
poisons the GGUF, and quantize would only fail much later ("code 1").
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from ..cancel import leave_interrupts_to_the_main_thread
from ..errors import ModelError
from .safetensors_io import OutputTensor, TensorEntry, byte_view, map_range, nonfinite_at, read_range

T = TypeVar("T")
_DONE = object()


class ExternalSource(Protocol):
    """Bytes of an output tensor that come from elsewhere than this shard (an adapter file, zeros)."""

    # Read-only: the sources are frozen dataclasses (Zeros) and properties (TensorRef).
    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self) -> torch.Tensor: ...


Source = TensorEntry | ExternalSource
_GAP_CHUNK = 64 << 20  # bytes hashed at a time between tensors, so a skipped tensor is never held whole


@dataclass(frozen=True)
class SourceTensor:
    out: OutputTensor
    source: Source
    data: torch.Tensor  # the source's raw bytes, uint8


class ShardReader:
    """Yields each output tensor's source bytes; tensors the output does not use are only hashed."""

    def __init__(self, path: Path, items: list[tuple[OutputTensor, Source]], known_sha256: str | None = None):
        self.path, self.items = path, items
        # A digest already known for this exact file is trusted; else it is taken on the way.
        self.sha256: str | None = known_sha256
        self._hash = known_sha256 is None

    @property
    def digest(self) -> str:
        """The shard's sha256: known up front, or once every tensor has been read."""
        if self.sha256 is None:
            raise RuntimeError(f"{self.path}: digest asked for before the shard was read to the end")
        return self.sha256

    def __iter__(self) -> Iterator[SourceTensor]:
        if not self._hash:
            yield from self._read_only()
            return
        digest = hashlib.sha256()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            position = 0  # every byte before this one has been hashed
            for out, entry in self.items:
                if not isinstance(entry, TensorEntry):
                    yield SourceTensor(out, entry, entry.read())
                    continue
                if entry.start < position:  # a second output from the same bytes (an untied lm_head)
                    yield SourceTensor(out, entry, map_range(fd, entry.start, entry.nbytes))
                    continue
                _hash_range(digest, fd, position, entry.start)  # the header, padding, or a replaced tensor
                data = map_range(fd, entry.start, entry.nbytes)
                digest.update(byte_view(data))
                self._check_finite(entry, data)
                position = entry.end
                yield SourceTensor(out, entry, data)
            _hash_range(digest, fd, position, size)
            self.sha256 = digest.hexdigest()
        finally:
            os.close(fd)

    def _read_only(self) -> Iterator[SourceTensor]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            checked: set[str] = set()
            for out, entry in self.items:
                if not isinstance(entry, TensorEntry):
                    yield SourceTensor(out, entry, entry.read())
                    continue
                data = map_range(fd, entry.start, entry.nbytes)
                if entry.name not in checked:  # a second output from the same bytes (an untied lm_head)
                    self._check_finite(entry, data)
                    checked.add(entry.name)
                yield SourceTensor(out, entry, data)
        finally:
            os.close(fd)

    def _check_finite(self, entry: TensorEntry, data: torch.Tensor) -> None:
        if found := nonfinite_at(data, entry.dtype, entry.shape):
            raise ModelError(f"{self.path}: tensor {entry.name!r} contains NaN or infinity (first: {found})")


def _hash_range(digest, fd: int, start: int, stop: int) -> None:
    for offset in range(start, stop, _GAP_CHUNK):
        digest.update(byte_view(read_range(fd, offset, min(_GAP_CHUNK, stop - offset))))


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` on a background thread, at most `depth` items ahead of the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
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
            yield item
    finally:
        stop.set()
        thread.join()
