"""The Hugging Face Hub, through huggingface_hub: what a repo revision holds, and downloading it.

`plan` must know a hub model's identity without downloading it: the revision is resolved to a
commit and every file's digest is taken from the hub's metadata (an LFS file's sha256, a small
file's git blob id), for exactly the files a bake reads. `download` then fetches those files at
that commit into the workspace, so the key computed by `plan` is the key `apply` builds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError, InvalidInputError

# What a bake and a conversion read; everything else in a repo (.bin, .pth, ONNX, ...) stays there.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.py"]


class HubUnavailableError(BuildError):
    """The hub could not be asked (offline, DNS, timeout): what depends on it is unknown for now."""


@dataclass(frozen=True)
class HubRevision:
    repo: str
    commit: str
    files: dict[str, str]  # path -> "sha256:..." (LFS) or "git-blob:..." (small files), the bake's files only

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.commit}"


def _hub():
    # Read at import by huggingface_hub: keep it from phoning home (telemetry) or switching transports.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub

    return huggingface_hub


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _translate(repo: str, revision: str | None, e: Exception) -> Exception:
    hub = _hub()
    errors = hub.errors
    where = f"source.model: {repo!r}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(e, errors.GatedRepoError):
        return BuildError(f"{where} is gated: accept its terms on the hub and set HF_TOKEN to a token that may "
                          "read it")
    if isinstance(e, errors.RepositoryNotFoundError):
        return InvalidInputError(f"{where}: no such repository on the hub (private? set HF_TOKEN), or use a "
                                 "local directory")
    if isinstance(e, errors.RevisionNotFoundError):
        return InvalidInputError(f"{where}: no such revision (source.revision)")
    if isinstance(e, errors.HfHubHTTPError):
        return BuildError(f"{where}: the hub answered {str(e).splitlines()[0][:200]}")
    return HubUnavailableError(f"{where}: the hub is not reachable ({type(e).__name__}); use a local "
                               "directory, or set HF_ENDPOINT to a mirror")


def resolve_revision(repo: str, revision: str | None) -> HubRevision:
    """The commit a revision names and the digests of the files a bake reads, without downloading them."""
    hub = _hub()
    try:
        info = hub.HfApi(endpoint=_endpoint()).model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # the client raises its own errors and raw transport errors alike
        raise _translate(repo, revision, e) from e
    wanted = set(hub.utils.filter_repo_objects([s.rfilename for s in info.siblings or []],
                                               allow_patterns=HUB_PATTERNS))
    files = {}
    for sibling in info.siblings or []:
        if sibling.rfilename in wanted:
            files[sibling.rfilename] = (f"sha256:{sibling.lfs.sha256}" if sibling.lfs is not None
                                        else f"git-blob:{sibling.blob_id}")
    if not any(path.endswith(".safetensors") for path in files):
        raise InvalidInputError(f"source.model: {repo!r} at {info.sha} has no .safetensors weights (only "
                                "safetensors are read; convert .bin checkpoints first)")
    return HubRevision(repo, info.sha, dict(sorted(files.items())))


def download(revision: HubRevision, cache_dir: Path) -> Path:
    """Fetch the bake's files at the resolved commit into the hub cache; returns the snapshot directory."""
    hub = _hub()
    try:
        path = hub.snapshot_download(revision.repo, revision=revision.commit, cache_dir=cache_dir,
                                     allow_patterns=HUB_PATTERNS, endpoint=_endpoint())
    except Exception as e:
        raise _translate(revision.repo, revision.commit, e) from e
    return Path(path)
