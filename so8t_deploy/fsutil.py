"""Atomic publication: the one way this project makes a file or a directory appear.

Everything is written under a staging name beside its final place, fsynced, renamed into place
and the parent directory fsynced, so a name that exists is complete and a killed writer leaves
only a staging name. Staging names carry the writer's host and pid: a staging entry is stale,
and may be removed, only once that process is gone.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

_STAGING_MARK = ".partial-"


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range, looked up on first use (not at import: every command imports this module)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range; do not wait


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a file range to disk now, without waiting for it (Linux; elsewhere a no-op).

    A later fsync then waits only for what is still in flight, instead of the whole file at once.
    """
    if (sync_file_range := _sync_file_range()) is not None:
        sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure only loses the head start


def fsync_path(path: Path) -> None:
    """Flush one file, or one directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory below root, then root itself (links are skipped)."""
    for path in [*sorted(root.rglob("*")), root]:
        if not path.is_symlink():
            fsync_path(path)


def staging_path(final: Path) -> Path:
    """A hidden name beside `final` that says who is writing it: `.NAME.partial-HOST-PID`."""
    return final.with_name(f".{final.name}{_STAGING_MARK}{socket.gethostname()}-{os.getpid()}")


def _owner_alive(staging: Path) -> bool:
    host, _, pid = staging.name.rpartition(_STAGING_MARK)[2].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's (a shared file system): not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(final: Path) -> None:
    """Remove staging entries of `final` whose writer process is gone."""
    if not final.parent.is_dir():
        return
    for staging in final.parent.glob(f".{final.name}{_STAGING_MARK}*"):
        if not _owner_alive(staging):
            _remove(staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    try:
        with open(staging, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        staging.replace(path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def symlink_atomic(link: Path, target: Path) -> None:
    """Point `link` at `target`, replacing whatever `link` was, in one rename."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(link)
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    staging.replace(link)
    fsync_path(link.parent)


def publish_file(staging: Path, final: Path) -> None:
    """Move a fully written file into place (fsynced first)."""
    fsync_path(staging)
    staging.replace(final)
    fsync_path(final.parent)


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written directory into place, replacing an incomplete one left there."""
    fsync_tree(staging)
    if final.exists():
        _remove(final)
    staging.rename(final)
    fsync_path(final.parent)
