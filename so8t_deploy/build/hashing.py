"""Content digests of files and directories, for provenance and cache keys."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..cancel import leave_interrupts_to_the_main_thread
from ..fsutil import write_atomic

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL on large buffers
    return digest.hexdigest()


def combined_digest(digests: dict[str, str]) -> str:
    """One digest over named digests, independent of dict order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


class DigestCache:
    """sha256 of files, remembered by (path, size, mtime, inode) so unchanged inputs are hashed once.

    Re-applying an unchanged manifest must be fast; rehashing a multi-GB model each time is not.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._entries: dict[str, list] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            self._entries = {}
        self._dirty = False

    @staticmethod
    def _signature(path: Path) -> tuple[str, list[int]]:
        stat = path.stat()
        return str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]

    def known(self, path: Path) -> str | None:
        """The digest, if this exact file (same size, mtime and inode) was hashed before."""
        key, signature = self._signature(path)
        cached = self._entries.get(key)
        return cached[3] if cached and cached[:3] == signature else None

    def record(self, path: Path, digest: str) -> None:
        key, signature = self._signature(path)
        self._entries[key] = [*signature, digest]
        self._dirty = True

    def file(self, path: Path) -> str:
        digest = self.known(path)
        if digest is None:
            digest = sha256_file(path)
            self.record(path, digest)
        return digest

    def directory(self, root: Path) -> dict[str, str]:
        """{relative path: sha256} of every file below root; unknown files are hashed in parallel."""
        files = sorted(p for p in root.rglob("*") if p.is_file())
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1,  # hashlib releases the GIL
                                initializer=leave_interrupts_to_the_main_thread) as pool:
            digests = list(pool.map(self.file, files))
        return {str(p.relative_to(root)): d for p, d in zip(files, digests, strict=True)}

    def knows_directory(self, root: Path) -> bool:
        return all(self.known(p) for p in root.rglob("*") if p.is_file())

    def reload(self) -> None:
        """Merge entries another process (a runner) saved meanwhile."""
        with contextlib.suppress(OSError, json.JSONDecodeError):
            self._entries.update(json.loads(self.path.read_text(encoding="utf-8")))

    def save(self) -> None:
        if not self._dirty:
            return
        write_atomic(self.path, json.dumps(self._entries))
        self._dirty = False
