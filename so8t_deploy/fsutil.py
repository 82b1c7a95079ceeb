"""Durability helpers: what an atomic publish fsyncs before its rename."""

from __future__ import annotations

import os
from pathlib import Path


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
