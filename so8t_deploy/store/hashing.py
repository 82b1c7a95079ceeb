"""Content digests of files and directories, for provenance and cache keys.

Which digest identifies what:

- A local input file (a model shard, an adapter file, a tokenizer) is identified by its BLAKE3
  digest, written `blake3:<hex>`. BLAKE3 hashes 4.6 GB/s on one core here and more on several, against
  sha256's 1.8 GB/s, and its identity is used only by this tool: cache keys, `so8t_bake.json`.
- A hub file is identified by the sha256 the hub lists for it (`sha256:<hex>`), verified once when
  it is downloaded; a bake of it trusts that record and hashes nothing.
- What this tool produces for others keeps sha256, because they check it: a GGUF's digest (Ollama and
  registries address blobs by it) and the keys derived from JSON.

`DigestCache` remembers digests by a file's stamp: size, mtime, inode and ctime. Any write to the file
changes its mtime and ctime; a program can set the mtime back, but not the ctime, which the kernel sets
to "now" on every change, utime included. So a file whose stamp is unchanged holds the bytes that were
hashed, and a changed one is hashed again. One gap remains, the one git calls "racy": a change within
the same clock tick as the stamp leaves the ctime as it was. So a stamp taken less than RACY_NS after
the file's last change proves nothing, and such a file is hashed again the next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import blake3

from ..cancel import leave_interrupts_to_the_main_thread
from ..fsutil import write_atomic

_CHUNK = 16 * 1024 * 1024
RACY_NS = 2_000_000_000  # wider than any file system's timestamp granularity (FAT's is 2 s)
BLAKE3 = "blake3"
SHA256 = "sha256"
ALGORITHMS = (BLAKE3, SHA256)


def new_blake3(threads: int = blake3.blake3.AUTO) -> blake3.blake3:
    """A BLAKE3 hasher; by default it spreads large updates over every core (it releases the GIL while it hashes)."""
    return blake3.blake3(max_threads=threads)


class _Hasher(Protocol):
    """What `_hash_file` needs of a hash object: blake3.blake3 or one of hashlib's."""

    def update(self, data: memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def _hash_file(path: Path, digest: _Hasher) -> str:
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def blake3_file(path: Path) -> str:
    """A local file's identity: `blake3:<hex>`."""
    return f"{BLAKE3}:{_hash_file(path, new_blake3())}"


def sha256_file(path: Path) -> str:
    """The sha256 of a file, as bare hex (what GGUF records and Ollama's blob names use)."""
    return _hash_file(path, hashlib.sha256())


def combined_digest(digests: dict[str, str]) -> str:
    """One digest over named digests, independent of dict order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Stamp:
    """What identifies a file's version without reading it, and when it was taken."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int
    taken_ns: int = field(compare=False)

    @classmethod
    def of(cls, path: Path) -> Stamp:
        taken = time.time_ns()
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, taken)

    def as_list(self) -> list[int]:
        return [self.size, self.mtime_ns, self.inode, self.ctime_ns]


class DigestCache:
    """Digests of files, remembered by path and stamp so that unchanged inputs are hashed once.

    Re-applying an unchanged manifest must be fast; rehashing a multi-GB model each time is not.
    The file is untrusted input: an entry that is not exactly what `record` writes is ignored.
    """

    def __init__(self, path: Path):
        self.path = path
        self._entries = self._load()
        self._dirty = False

    def _load(self) -> dict[str, dict[str, Any]]:
        """The saved entries that are valid; none if the file is missing or not a JSON mapping."""
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                return {k: v for k, v in loaded.items() if _valid_entry(v)}
        return {}

    def known(self, path: Path, algorithm: str = BLAKE3, stamp: Stamp | None = None) -> str | None:
        """The bare hex digest, if this exact file (same stamp) was hashed with `algorithm` before."""
        entry = self._entries.get(str(path.resolve()))
        stamp = stamp or Stamp.of(path)
        if entry is None or entry["stamp"] != stamp.as_list() or _racy(entry):
            return None
        return entry.get(algorithm)

    def identity(self, path: Path, stamp: Stamp | None = None) -> str | None:
        """A verified `algorithm:hex` for the file, without reading it: the hub's sha256 first, else BLAKE3."""
        stamp = stamp or Stamp.of(path)
        for algorithm in (SHA256, BLAKE3):
            if digest := self.known(path, algorithm, stamp):
                return f"{algorithm}:{digest}"
        return None

    def record(self, path: Path, digest: str, algorithm: str = BLAKE3, stamp: Stamp | None = None, *,
               exclusive: bool = False) -> None:
        """Remember a digest (bare hex, or `algorithm:hex`); `stamp` is the file's stamp before it was read.

        `exclusive`: the digest was taken while nothing else could write the file (a download, hashed under
        its lock and only then renamed into place), so its stamp is trusted at once, with no racy window.
        """
        prefix, _, hex_digest = digest.rpartition(":")
        if prefix and prefix != algorithm:
            raise ValueError(f"a {prefix} digest recorded as {algorithm}")
        stamp = stamp or Stamp.of(path)
        key, signature = str(path.resolve()), stamp.as_list()
        taken = max(stamp.taken_ns, stamp.ctime_ns + RACY_NS) if exclusive else stamp.taken_ns
        entry = self._entries.get(key)
        if entry is None or entry["stamp"] != signature or _racy(entry):
            entry = {"stamp": signature, "taken": taken}  # digests of another version are dropped
        self._entries[key] = {**entry, algorithm: hex_digest}
        self._dirty = True

    def file(self, path: Path) -> str:
        """The file's BLAKE3 identity, `blake3:<hex>`: remembered, or hashed now."""
        stamp = Stamp.of(path)
        if digest := self.known(path, BLAKE3, stamp):
            return f"{BLAKE3}:{digest}"
        identity = blake3_file(path)
        self.record(path, identity, BLAKE3, stamp)
        return identity

    def directory(self, root: Path) -> dict[str, str]:
        """{relative path: identity} of every file below root; unknown files are hashed in parallel."""
        files = sorted(p for p in root.rglob("*") if p.is_file())
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1,  # BLAKE3 releases the GIL
                                initializer=leave_interrupts_to_the_main_thread) as pool:
            digests = list(pool.map(self.file, files))
        return {str(p.relative_to(root)): d for p, d in zip(files, digests, strict=True)}

    def knows_directory(self, root: Path) -> bool:
        return all(self.known(p) for p in root.rglob("*") if p.is_file())

    def reload(self) -> None:
        """Merge entries another process (a runner) saved meanwhile."""
        self._entries.update(self._load())

    def save(self) -> None:
        if not self._dirty:
            return
        write_atomic(self.path, json.dumps(self._entries))
        self._dirty = False


def _racy(entry: dict[str, Any]) -> bool:
    """The entry's stamp was taken so soon after the file's last change that a further change could keep it."""
    return bool(entry["taken"] - entry["stamp"][3] < RACY_NS)


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict) or set(entry) - {"stamp", "taken", *ALGORITHMS}:
        return False
    if type(entry.get("taken")) is not int:
        return False
    stamp = entry.get("stamp")
    if not (isinstance(stamp, list) and len(stamp) == 4 and all(type(n) is int for n in stamp)):
        return False
    return all(isinstance(entry[a], str) and len(entry[a]) == 64 and all(c in "0123456789abcdef" for c in entry[a])
               for a in ALGORITHMS if a in entry)
