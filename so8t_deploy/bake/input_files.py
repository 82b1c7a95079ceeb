"""Which entries of a model or adapter directory may be read: regular files, and links that stay home.

Every input directory is walked with lstat before any file in it is opened. A FIFO would block
the first read forever, a device or socket is no weight file, and a symlink to /etc/shadow would
be hashed and then copied into the cache beside the tokenizer. So:

- a regular file is read; a subdirectory is walked the same way;
- a symlink is followed only to a regular file whose real path (every link resolved) lies inside
  one of the directory's *homes*; a link to a directory, a broken link and a link that leaves home
  are refused;
- anything else (FIFO, socket, device) is refused.

The homes are the directory itself and, for a huggingface_hub cache snapshot
(`…/models--org--name/snapshots/<commit>/`, whose files are links to `../../blobs/<hash>`), that
repo's `blobs/` folder too. Nothing else in the hub cache qualifies: not another snapshot, not
`refs/`, not another repo's blobs.

Torch-free: `validate`, `plan` and `apply` run this on a control machine without the ML stack.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InvalidInputError
from ..external.hub import snapshot_blobs

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def input_homes(directory: Path) -> tuple[Path, ...]:
    """Where links below `directory` may point: itself, plus the blob store of a hub cache snapshot."""
    real = directory.resolve()
    blobs = snapshot_blobs(real)
    return (real,) if blobs is None else (real, blobs)


def check_input_tree(directory: Path, error: type[InvalidInputError]) -> None:
    """Refuse, with `error` naming the entry, anything below `directory` that is not safe to read."""
    _check_entries(directory, input_homes(directory), error)


def _check_entries(directory: Path, homes: tuple[Path, ...], error: type[InvalidInputError]) -> None:
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise error(f"{directory}: cannot list: {e.strerror}") from e
    for name in names:
        path = directory / name
        mode = _mode(path, homes, error)
        if stat.S_ISDIR(mode):
            _check_entries(path, homes, error)
        elif not stat.S_ISREG(mode):
            kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
            raise error(f"{path}: {kind}; only regular files are read")
        elif not os.access(path, os.R_OK):
            raise error(f"{path}: not readable")


def _mode(path: Path, homes: tuple[Path, ...], error: type[InvalidInputError]) -> int:
    """The entry's file type: its own, or its target's for a link that stays home."""
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISLNK(mode):
            return mode
        target = os.readlink(path)
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(home) for home in homes):
            where = " or ".join(str(home) for home in homes)
            raise error(f"{path}: a symlink to {target}, outside {where}; only links that stay inside are followed")
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: a broken symlink") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from e
    if stat.S_ISDIR(mode):
        raise error(f"{path}: a symlink to a directory; only links to regular files are followed")
    return mode
