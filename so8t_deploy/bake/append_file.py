"""A file written front to back past the page cache (O_DIRECT), through two aligned buffers.

A bake writes as many bytes as it reads, once, and nothing reads them back soon: `convert` runs
later, often in another process or container. Written through the page cache, every byte costs
the CPU a copy into a freshly allocated cache page, which on the virtual machines this runs on
measured 0.6-2.5 CPU-seconds per GB (it varies with how recently the host backed that memory),
and evicts the base model's pages that the next variant's bake will read. Written with O_DIRECT,
the disk takes the bytes straight from the buffer: 0.04 CPU-seconds per GB, at the disk's speed.

Bytes are copied into one of two page-aligned buffers; a full buffer is written at its file
offset by a background thread while the other one fills. `close` pads the last block, writes it,
truncates the file to its length and fsyncs. Where the file system refuses O_DIRECT (tmpfs,
some FUSE and network file systems: at open or at the first write), the same buffers are written
through the page cache instead, and writeback is started as the file grows.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..cancel import leave_interrupts_to_the_main_thread
from ..errors import ModelError
from ..fsutil import start_writeback
from .phases import PhaseTimes

ALIGN = 4096  # O_DIRECT offsets, lengths and addresses: a multiple of every common logical block size
BUFFER_BYTES = 32 << 20
_NO_DIRECT_IO = {errno.EINVAL, errno.EOPNOTSUPP}


class AppendFile:
    """Create `path` (truncating it) and append to it; `close` makes it durable, `abandon` gives it up."""

    def __init__(self, path: Path, times: PhaseTimes | None = None, buffer_bytes: int = BUFFER_BYTES,
                 direct: bool = True):
        if buffer_bytes <= 0 or buffer_bytes % ALIGN:
            raise ValueError(f"buffer_bytes must be a positive multiple of {ALIGN}, got {buffer_bytes}")
        self.path = path
        self.times = times or PhaseTimes()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno not in _NO_DIRECT_IO:
                    raise
        self.direct = self._fd >= 0
        if not self.direct:
            self._fd = os.open(path, flags, 0o644)
        self._buffers: tuple[mmap.mmap, ...] = (mmap.mmap(-1, buffer_bytes), mmap.mmap(-1, buffer_bytes))
        self._current = 0
        self._fill = 0  # bytes in the current buffer
        self._flushed = 0  # file offset of the current buffer's first byte
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="so8t-write",
                                          initializer=leave_interrupts_to_the_main_thread)
        self._pending: Future[None] | None = None

    @property
    def size(self) -> int:
        """Bytes appended so far."""
        return self._flushed + self._fill

    def write(self, data: memoryview) -> None:
        """Append `data` (any contiguous buffer)."""
        data = data.cast("B")
        with self.times.phase("write"):
            done = 0
            while done < len(data):
                space = self._space(len(data) - done)
                space[:] = data[done:done + len(space)]
                self._filled(len(space))
                done += len(space)

    def copy_from(self, fd: int, offset: int, nbytes: int) -> None:
        """Append bytes [offset, offset + nbytes) of an open file, read straight into the buffers."""
        with self.times.phase("write"):
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [self._space(nbytes - done)], offset + done)
                if n == 0:
                    raise ModelError(f"file descriptor {fd}: unexpected end of file at byte {offset + done}")
                self._filled(n)
                done += n

    def close(self) -> None:
        """Write what is buffered, cut the file to its length, fsync and close. Raises what any write raised."""
        try:
            size = self.size
            with self.times.phase("write"):
                if self._fill:
                    tail = -self._fill % ALIGN if self.direct else 0
                    self._buffers[self._current][self._fill:self._fill + tail] = bytes(tail)  # zeros, cut off below
                    self._hand_over(self._fill + tail)
                self._wait()
            with self.times.phase("fsync"):
                os.ftruncate(self._fd, size)
                os.fsync(self._fd)
        finally:
            self._release()

    def abandon(self) -> None:
        """Close without finishing (the caller removes the file); errors of writes in flight are dropped."""
        try:
            self._wait()
        except OSError:
            pass
        finally:
            self._release()

    def _space(self, most: int) -> memoryview:
        """The current buffer's next free bytes, at most `most`: fill them, then say how many with `_filled`."""
        buffer = self._buffers[self._current]
        return memoryview(buffer)[self._fill:min(self._fill + most, len(buffer))]

    def _filled(self, n: int) -> None:
        """`n` more bytes are in the current buffer: once it is full, it goes to the writer thread."""
        self._fill += n
        if self._fill == len(self._buffers[self._current]):
            self._hand_over(self._fill)

    def _hand_over(self, length: int) -> None:
        """Queue the current buffer's first `length` bytes for writing, then fill the other once it is free."""
        self._wait()  # the other buffer's write: done before it is reused, and its error raised here
        view = memoryview(self._buffers[self._current])[:length]
        self._pending = self._writer.submit(self._write_at, view, self._flushed)
        self._flushed += self._fill
        self._current ^= 1
        self._fill = 0

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_at(self, view: memoryview, offset: int) -> None:
        try:
            with self.times.phase("disk"):
                done = 0
                while done < len(view):
                    try:
                        done += os.pwrite(self._fd, view[done:], offset + done)
                    except OSError as e:
                        if not (self.direct and e.errno in _NO_DIRECT_IO):
                            raise
                        self._leave_direct_io()  # accepted at open, refused at the write: through the cache, then
                if not self.direct:
                    start_writeback(self._fd, offset, len(view))
        finally:
            view.release()  # this view's hold on the buffer ends here, even if a traceback keeps the view

    def _leave_direct_io(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _release(self) -> None:
        self._writer.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._buffers = ()  # unmapped once no view of them is left (a failed write's traceback may hold one)
