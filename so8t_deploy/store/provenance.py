"""The one definition of an input's digest, and the name of the file a bake records its inputs in.

Cache keys, the bake's so8t_bake.json and the GGUF metadata all take an adapter's digest from
here, so one adapter has one digest on every path.
"""

from __future__ import annotations

from pathlib import Path

from .hashing import DigestCache, combined_digest

PROVENANCE_FILE = "so8t_bake.json"  # what a bake writes beside its weights


def directory_digest(path: Path, digests: DigestCache) -> tuple[str, dict[str, str]]:
    """One digest over every file below `path`, and each file's sha256."""
    files = digests.directory(path)
    return combined_digest(files), files


def adapter_digest(path: Path, digests: DigestCache) -> tuple[str, dict[str, str]]:
    """An adapter's one digest: over every file in its directory.

    The whole directory, not only the weights: a tokenizer saved beside a resized embedding is
    part of what the bake writes.
    """
    return directory_digest(path, digests)
