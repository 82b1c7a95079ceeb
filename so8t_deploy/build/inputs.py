"""Resolve a manifest's inputs to digests: the source model (a local directory or a hub revision) and
each adapter, in fold order.

A local directory is hashed with BLAKE3 (each file once, remembered by its stamp: size, mtime,
inode, ctime). A hub model's identity comes from the hub's metadata, never from downloading it:
the commit a revision names and the digest of each file a bake reads. `plan` resolves without downloading; `apply` also
downloads, at the commit the plan saw.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..external.hub import CHAT_FILES, HubUnavailableError, download, resolve_revision
from ..manifest.schema import Manifest
from ..progress import Progress
from ..store.hashing import combined_digest
from ..store.provenance import adapter_digest, directory_digest
from ..store.workspace import Workspace
from .calibration import load_calibration
from .check import check_readable
from .plan import AdapterInput, BuildInputs

UNKNOWN_UNTIL_DOWNLOAD = "key known after download"


def resolve_inputs(manifest: Manifest, workspace: Workspace, progress: Progress, *, download_model: bool,
                   hub_commit: str | None = None, manifest_path: Path | None = None,
                   offline: bool = False, verify_cache: bool = False) -> BuildInputs:
    """Digests of every input; with `download_model`, the model is also on this machine afterwards.

    `offline` asks no hub: a hub model's keys are then unknown (plan --offline).
    `hub_commit` pins a hub model to the commit a saved plan resolved, so apply builds what it showed.
    `manifest_path` is named in hub errors ("MANIFEST: source.model: 'org/name' ...").
    A downloaded hub model's cached files are checked against the hub's digests before every use: by their
    stamps, or, with `verify_cache`, by hashing them again.
    """
    imatrix = manifest.quantize.imatrix
    # Plain calibration text needs no model: read it first, so a missing file is said before any download.
    calibration = load_calibration(imatrix, None) if imatrix is not None and imatrix.text is not None else None
    inputs = _resolve_model(manifest, workspace, progress, download_model=download_model, hub_commit=hub_commit,
                            manifest_path=manifest_path, offline=offline, verify_cache=verify_cache)
    if imatrix is None or inputs.model_digest is None:
        return inputs
    return replace(inputs, calibration=calibration or load_calibration(imatrix, inputs.chat_dir))


def _resolve_model(manifest: Manifest, workspace: Workspace, progress: Progress, *, download_model: bool,
                   hub_commit: str | None, manifest_path: Path | None, offline: bool,
                   verify_cache: bool) -> BuildInputs:
    check_readable(manifest)
    digests = workspace.digests()
    try:
        adapters = tuple(AdapterInput(ref, adapter_digest(ref.path, digests)[0]) for ref in manifest.source.adapters)
        source = manifest.source
        if source.is_local:
            path = Path(source.model)
            if not digests.knows_directory(path):
                progress.step(f"hashing {path}")
            return BuildInputs(str(path), directory_digest(path, digests)[0], adapters, source_dir=path,
                               chat_dir=path)
        if offline:
            return BuildInputs(source.model, None, adapters, note=UNKNOWN_UNTIL_DOWNLOAD)
        origin = f"{manifest_path}: source.model" if manifest_path else "source.model"
        try:
            revision = resolve_revision(source.model, hub_commit or source.revision, origin=origin)
        except HubUnavailableError as e:
            if download_model:
                raise
            progress.warning(str(e))
            return BuildInputs(source.model, None, adapters, note=UNKNOWN_UNTIL_DOWNLOAD)
        model_dir = None
        if download_model:
            progress.step(f"download {revision.label}")
            model_dir = download(revision, workspace.hub, digests, origin=origin, verify=verify_cache,
                                 warn=progress.warning)
            chat_dir = model_dir
        else:
            chat_dir = download(revision, workspace.hub, digests, origin=origin, verify=verify_cache,
                                warn=progress.warning, only=CHAT_FILES)
        return BuildInputs(revision.label, combined_digest(revision.files), adapters, source_dir=model_dir,
                           chat_dir=chat_dir, hub_commit=revision.commit)
    finally:
        digests.save()
