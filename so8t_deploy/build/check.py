"""That a manifest's local inputs exist and can be read: what plan and apply check first (the
`check` command's deeper checks are in deploy/check.py)."""

from __future__ import annotations

import os
from pathlib import Path

from ..bake.input_files import check_input_tree
from ..errors import AdapterError, ModelError
from ..manifest.schema import Manifest


def _readable_dir(path: Path, error: type[AdapterError] | type[ModelError], what: str) -> None:
    if not path.is_dir():
        raise error(f"{what}: {path}: directory not found")
    if not os.access(path, os.R_OK | os.X_OK):
        raise error(f"{what}: {path}: directory not readable")
    check_input_tree(path, error)  # before plan hashes it: a FIFO would hang, a link out would be read


def check_readable(manifest: Manifest) -> None:
    """Every local input exists and can be read (cheap: plan and apply do this too)."""
    if manifest.source.is_local:
        _readable_dir(Path(manifest.source.model), ModelError, "source.model")
    for i, adapter in enumerate(manifest.source.adapters):
        _readable_dir(adapter.path, AdapterError, f"source.adapters[{i}].path")
