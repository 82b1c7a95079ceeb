"""Read user-supplied files: bounded text (manifests, saved plans) and JSON objects (adapters, model configs),
with the file named in every error."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_bounded_text(path: Path, limit: int, what: str, error: type[InvalidInputError]) -> str:
    """The file's text, if it is a regular file of at most `limit` bytes of UTF-8; else error("PATH: cannot read
    WHAT: why").

    Opened without blocking and checked on the open descriptor: a FIFO cannot hang the open or the read, nor
    /dev/zero fill memory, nor a file swapped in after a check slip past it."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    where = f"{path}: cannot read {what}"
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(f"{where}: {e.strerror or e}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
            raise error(f"{where}: not a regular file ({kind})")
        data = _read_at_most(fd, limit + 1)
    except OSError as e:
        raise error(f"{where}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{where}: larger than {limit >> 20} MiB, the limit for a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start})") from None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(1 << 16, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_json_object(path: Path, error: type[InvalidInputError], missing: str = "missing") -> dict[str, Any]:
    """The file's JSON object; `error(...)` naming the file if it is absent, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
