"""A content-addressed artifact cache with atomic publication.

An artifact lives in ``ROOT/STAGE/KEY/`` where KEY hashes every input that affects its
bytes. It is produced in a hidden staging directory, fsynced, stamped with
``artifact.json`` (the completion marker) and renamed into place, so a directory that
exists is complete, and a killed producer leaves only a staging directory that nobody
trusts and the next producer of the same key removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .fsutil import fsync_tree

MARKER = "artifact.json"
DIGEST_FILE = "digests.json"  # a DigestCache beside the artifacts: input hashes by file identity


def default_cache_root() -> Path:
    """Per-user cache for the converter and input digests ($SO8T_CACHE_DIR overrides)."""
    return Path(os.environ.get("SO8T_CACHE_DIR") or Path.home() / ".cache" / "so8t-deploy")


def cache_key(**inputs: object) -> str:
    """A stable digest of JSON-serialisable inputs."""
    encoded = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


class ArtifactCache:
    def __init__(self, root: Path):
        self.root = root

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> dict | None:
        """The artifact's recorded info if it is complete, else None."""
        marker = self.path(stage, key) / MARKER
        try:
            return json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    @contextmanager
    def produce(self, stage: str, key: str | Callable[[], str]) -> Iterator[tuple[Path, dict]]:
        """Yield (staging dir, info dict); on success the info becomes the marker and the dir is published.

        `key` may be a callable, resolved only after the body ran: a step whose inputs are hashed
        while it runs (the bake) learns its own key at the end, like a VCS writing an object.
        The resolved key is recorded in the info as "key".
        """
        parent = self.root / stage
        parent.mkdir(parents=True, exist_ok=True)
        name = key if isinstance(key, str) else "unkeyed"
        for stale in parent.glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = parent / f".{name}.partial-{os.getpid()}"
        staging.mkdir()
        info: dict = {}
        try:
            yield staging, info
            info["key"] = key if isinstance(key, str) else key()
            final = self.path(stage, info["key"])
            if (final / MARKER).is_file():  # built meanwhile, or the unkeyed step was not new after all
                shutil.rmtree(staging)
                return
            (staging / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            fsync_tree(staging)
            if final.exists():  # an incomplete leftover (no marker): replace it
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

