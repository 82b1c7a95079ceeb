"""The workspace: every path under --cache-dir, its locks, and content-addressed artifacts.

    CACHE_DIR/
      objects/STAGE/KEY/     a published artifact: its files plus artifact.json (the completion marker)
      digests.json           input file digests, remembered by (size, mtime, inode, ctime)
      hosts/                 per-host journals of what was created and verified
      releases/NAME/TAG/     each tag's Modelfile and a link to its GGUF, for `ollama create -f`
      hub/                   hub downloads (huggingface_hub's cache layout; .partial/: LFS files to resume)
      converter/             llama.cpp's converter, extracted from the pinned sdist
      locks/                 one lock file per artifact key and per host

An artifact's KEY hashes everything that affects its bytes. It is produced under a lock for its
key, in a staging directory named after its writer, published atomically, and only then marked
complete; a second build of the same key waits for the first and reuses its result.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..errors import BuildError
from ..fsutil import fsync_tree, publish_dir, remove_stale_staging, staging_path, write_atomic
from .hashing import DigestCache

MARKER = "artifact.json"
SO8T_CACHE_ENV = "SO8T_CACHE_DIR"  # where commands without --cache-dir (and the worker image) keep things


def cache_key(**inputs: object) -> str:
    """A stable digest of JSON-serialisable inputs."""
    encoded = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


def default_root() -> Path:
    """For commands that have no --cache-dir: $SO8T_CACHE_DIR, else the user's cache directory."""
    return Path(os.environ.get(SO8T_CACHE_ENV) or Path.home() / ".cache" / "so8t-deploy")


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", self.root.expanduser().absolute())

    # -- layout ------------------------------------------------------------------------------------

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def digests_file(self) -> Path:
        return self.root / "digests.json"

    @property
    def hosts(self) -> Path:
        return self.root / "hosts"

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def converter(self) -> Path:
        return self.root / "converter"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def digests(self) -> DigestCache:
        return DigestCache(self.digests_file)

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.objects / stage / key

    # -- locks -------------------------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock shared by every process using this workspace (a file lock)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.locks / f"{name}.lock")):
            yield

    # -- artifacts ---------------------------------------------------------------------------------

    def lookup(self, stage: str, key: str, *, verify: bool = False) -> dict[str, Any] | None:
        """The artifact's recorded info if it is complete and intact, else None (a damaged one is rebuilt)."""
        return self.inspect(stage, key, verify=verify)[0]

    def inspect(self, stage: str, key: str, *, verify: bool = False) -> tuple[dict[str, Any] | None, str | None]:
        """(record, None) for a complete, intact artifact; (None, why) for a damaged one; (None, None) if absent.

        Intact means every file it was published with is still there with its size and mtime
        (cheap: a stat per file); with `verify`, a GGUF's bytes are also hashed against its sha256.
        """
        directory = self.artifact_dir(stage, key)
        try:
            record = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, None
        if not isinstance(record, dict):
            return None, f"{directory / MARKER}: not an artifact record"
        damage = _damage(directory, record.get("files", {}), record if verify else None)
        return (None, damage) if damage else (record, None)

    @contextmanager
    def produce(self, stage: str, key: str) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Yield (staging dir, info dict) under the key's lock; on success the info becomes the marker.

        The caller checks `lookup` again inside: another process may have published the key while
        this one waited for the lock.
        """
        final = self.artifact_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(final)
        staging = staging_path(final)
        staging.mkdir()
        info: dict[str, Any] = {}
        try:
            yield staging, info
            info["key"] = key
            fsync_tree(staging)  # before the stamps: what is stamped is what is on disk
            info["files"] = _stamps(staging)
            write_atomic(staging / MARKER, json.dumps(info, indent=2, sort_keys=True) + "\n")
            publish_dir(staging, final)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a fault of the machine, not of this run's inputs
                raise BuildError(f"{stage}: no space left on the device of {self.root} (nothing partial was kept); "
                                 "free some, or choose another --cache-dir") from e
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def scratch(self, name: str) -> Path:
        """A private directory for one process's temporary files, inside the workspace (those of
        processes that are gone are removed first)."""
        remove_stale_staging(self.root / "tmp" / name)
        path = staging_path(self.root / "tmp" / name)
        path.mkdir(parents=True, exist_ok=True)
        return path


def _stamps(directory: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every file an artifact is published with."""
    stamps = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            stamps[str(path.relative_to(directory))] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _damage(directory: Path, stamps: dict[str, list[int]], verify_record: dict[str, Any] | None) -> str | None:
    """Why a published artifact cannot be trusted any more, or None."""
    for name, (size, mtime_ns) in stamps.items():
        try:
            stat = (directory / name).stat()
        except OSError:
            return f"{directory / name} is missing"
        if stat.st_size != size or stat.st_mtime_ns != mtime_ns:
            return f"{directory / name} changed since it was built (size {stat.st_size}, was {size})"
    if verify_record and verify_record.get("sha256") and verify_record.get("file"):
        from .hashing import combined_digest, sha256_file

        parts = verify_record.get("parts") or []  # a split GGUF: its sha256 is over its parts' digests
        found = combined_digest({p: sha256_file(directory / p) for p in parts}) if parts else \
            sha256_file(directory / verify_record["file"])
        if found != verify_record["sha256"]:
            return f"{directory / verify_record['file']} does not hash to its recorded sha256"
    return None
