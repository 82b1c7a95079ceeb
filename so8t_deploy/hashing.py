"""Content digests of files and directories, for provenance and cache keys."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL on large buffers
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path) -> dict[str, str]:
    """{relative path: sha256} for every file, sorted by path."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(paths)}


def combined_digest(digests: dict[str, str]) -> str:
    """One digest over named digests, independent of dict order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()
