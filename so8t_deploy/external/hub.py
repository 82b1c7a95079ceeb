"""The Hugging Face Hub, through huggingface_hub: what a repo revision holds, and downloading it.

`plan` must know a hub model's identity without downloading it: the revision is resolved to a
commit and every file's digest is taken from the hub's metadata (an LFS file's sha256, a small
file's git blob id), for exactly the files a bake reads. `download` then fetches those files at
that commit into the workspace, so the key computed by `plan` is the key `apply` builds.

Downloads resume. huggingface_hub resumes only within one call, only past its 10 MiB write pieces,
and not after a reset connection; what a failed call received is deleted. A multi-GB safetensors
file cut near its end, or a killed run, would start again from byte 0. Each LFS file (the weights)
is therefore fetched here into `CACHE/.partial/<sha256>`, written as it arrives, asked for with a
`Range` from what is there, retried within the run while attempts add bytes, and kept for the next
run when they stop doing so. Only a file whose sha256 is the hub's moves into huggingface_hub's
blob store, where `snapshot_download` finds it and fetches only the small files around it; those
are then checked against their git blob ids. A cut never leaves a file the bake trusts, and a
cached snapshot of the commit is never taken on faith.

Everything the hub says is untrusted. Every value of its metadata that becomes a path on this
machine is checked first: each file name must be a relative path inside the snapshot, each LFS
sha256 64 hex digits (the name its blob is stored under), each git blob id 40. A cached file is
checked against the digest the hub lists for it before every use: cheaply by its stamp
(size, mtime, inode and ctime, recorded when it was verified), fully by hashing with `verify`; a damaged one is fetched
again with a warning, and never baked.

Every error names what named the repo (`origin`: "MANIFEST: source.model") and the next step: a
local directory, HF_TOKEN or HF_ENDPOINT. A hub that answers, but not as the hub (an HTML page,
a 401 without the hub's error code), is told apart from one that does not answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

from filelock import FileLock

from ..errors import BuildError, InvalidInputError, So8tError
from ..store.hashing import sha256_file

# What a bake and a conversion read; everything else in a repo (.bin, .pth, ONNX, ...) stays there.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.py", "chat_template.jinja"]
# What `plan` reads of a hub model without downloading it: the chat template and the tokens that end a turn.
CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json")
ATTEMPTS_WITHOUT_PROGRESS = 3  # attempts in a row that add no byte to a file before a run gives up on it
RETRY_PAUSE_S = 1.0  # before an attempt that follows one that added nothing; doubles each time
# How that pause is waited out, looked up at each pause: time.sleep. Tests that only need the retry, not its
# pause, replace it with one that returns at once (tests/conftest.py, `instant_retries`).
retry_sleep: Callable[[float], None] = time.sleep
PARTIAL_DIR = ".partial"  # under the hub cache: LFS files being downloaded, named by their sha256
MIB = 1 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_GIT_ID_RE = re.compile(r"[0-9a-f]{40}")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
MAX_REPO_PATH = 1024
_SHA256 = "sha256"  # the digest cache's name for the digest the hub lists
T = TypeVar("T")


class FileDigests(Protocol):
    """Remembered digests of files by their stamp: size, mtime, inode, ctime (the workspace's digest cache)."""

    def known(self, path: Path, algorithm: str = ...) -> str | None: ...

    def record(self, path: Path, digest: str, algorithm: str = ..., *, exclusive: bool = ...) -> None: ...


class HubUnavailableError(BuildError):
    """The hub could not be asked (offline, DNS, timeout, 5xx): what depends on it is unknown for now."""


class HubAnswerError(BuildError):
    """The hub answered, but not as the hub does: an HTML page, a bare 401, metadata that is not valid."""


class HubDownloadError(HubUnavailableError):
    """A download kept failing: what arrived is kept, and the next run resumes from there."""


@dataclass(frozen=True)
class HubRevision:
    repo: str
    commit: str
    files: dict[str, str]  # path -> "sha256:..." (LFS) or "git-blob:..." (small files), the bake's files only

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.commit}"


def _hub() -> ModuleType:
    # Read at import by huggingface_hub: keep it from phoning home (telemetry) or switching transports.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub

    return huggingface_hub


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _endpoint_label() -> str:
    return _endpoint() or _hub().constants.ENDPOINT


def _transport_errors() -> tuple[type[Exception], ...]:
    import httpx2  # huggingface_hub's HTTP client: its connection errors come out raw

    return (httpx2.TransportError,)


def _translate(origin: str, repo: str, revision: str | None, e: Exception) -> Exception:
    """The one place a hub error becomes ours: one line, what named the repo, and what to do next."""
    errors = _hub().errors
    where = f"{origin}: {repo!r}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(e, errors.GatedRepoError):  # a RepositoryNotFoundError too: ask first
        status = getattr(e.response, "status_code", None)
        token = ("no token was sent" if status == 401 else "the token sent (HF_TOKEN) is not granted access")
        return BuildError(f"{where} is gated on the hub and {token}: accept its terms on the hub, then set HF_TOKEN "
                          "to a token of that account (or use a local directory)")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.HfHubHTTPError) and status == 401 and not _hub_error_code(e):
        return HubAnswerError(f"{where}: the hub at {_endpoint_label()} answered 401 Unauthorized without saying "
                              "why: it wants a token: set HF_TOKEN (or check HF_ENDPOINT)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return InvalidInputError(f"{where}: no such repository on {_endpoint_label()} (a private one needs "
                                 "HF_TOKEN; a mirror is set with HF_ENDPOINT), or use a local directory")
    if isinstance(e, errors.RevisionNotFoundError):
        return InvalidInputError(f"{where}: no such revision on the hub: set source.revision to a commit, branch or "
                                 "tag of it")
    if isinstance(e, ValueError | TypeError | KeyError | AttributeError):  # a 200 that is not the hub's JSON
        return HubAnswerError(f"{where}: the hub at {_endpoint_label()} answered with something that is not the "
                              "hub's API (an HTML page, a proxy's login page?): check HF_ENDPOINT")
    if isinstance(e, errors.HfHubHTTPError) and not (status is not None and (status >= 500 or status == 429)):
        return BuildError(f"{where}: the hub answered {str(e).splitlines()[0][:200]} (a mirror is set with "
                          "HF_ENDPOINT; or use a local directory)")
    reason = f"answered {status}" if status is not None else f"is not reachable ({type(e).__name__})"
    return HubUnavailableError(f"{where}: the hub at {_endpoint_label()} {reason}; use a local directory, or set "
                               "HF_ENDPOINT to a mirror")


def _hub_error_code(e: Exception) -> str | None:
    response = getattr(e, "response", None)
    return response.headers.get("X-Error-Code") if response is not None else None


def _checked_path(name: object, where: str) -> str:
    """A repo file name that is a relative path inside the snapshot; HubAnswerError otherwise."""
    if (isinstance(name, str) and 0 < len(name) <= MAX_REPO_PATH and not PurePosixPath(name).is_absolute()
            and "\\" not in name and "\0" not in name and all(part not in ("", ".", "..") for part in name.split("/"))):
        return name
    raise HubAnswerError(f"{where}: the hub's metadata names a file {str(name)[:80]!r}, which is not a path inside "
                         "the repository; refusing it (check HF_ENDPOINT)")


def _checked_digest(value: object, pattern: re.Pattern[str], what: str, path: str, where: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise HubAnswerError(f"{where}: the hub's metadata gives {path} the {what} {str(value)[:80]!r}, which is "
                             "not one; refusing it (check HF_ENDPOINT)")
    return value


def resolve_revision(repo: str, revision: str | None, *, origin: str = "source.model") -> HubRevision:
    """The commit a revision names and the digests of the files a bake reads, without downloading them.

    A gated repo's metadata is public: one HEAD of a file tells whether the token may read it."""
    hub = _hub()
    try:
        info = hub.HfApi(endpoint=_endpoint()).model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # the client raises its own errors and raw transport errors alike
        raise _translate(origin, repo, revision, e) from e
    where = f"{origin}: {repo!r}"
    commit = _checked_digest(info.sha, _COMMIT_RE, "commit", "the revision", where)
    names = [_checked_path(s.rfilename, where) for s in info.siblings or []]
    wanted = set(hub.utils.filter_repo_objects(names, allow_patterns=HUB_PATTERNS))
    files = {}
    for sibling in info.siblings or []:
        if sibling.rfilename not in wanted:
            continue
        if sibling.lfs is not None:
            sha256 = _checked_digest(sibling.lfs.sha256, _SHA256_RE, "sha256", sibling.rfilename, where)
            files[sibling.rfilename] = f"sha256:{sha256}"
        else:
            blob_id = _checked_digest(sibling.blob_id, _GIT_ID_RE, "git blob id", sibling.rfilename, where)
            files[sibling.rfilename] = f"git-blob:{blob_id}"
    if not any(path.endswith(".safetensors") for path in files):
        raise InvalidInputError(f"{origin}: {repo!r} at {commit} has no .safetensors weights (only safetensors "
                                "are read; convert .bin checkpoints first, or use a local directory)")
    if info.gated:
        try:
            hub.get_hf_file_metadata(hub.hf_hub_url(repo, min(files), revision=commit, endpoint=_endpoint()),
                                     endpoint=_endpoint())
        except Exception as e:
            raise _translate(origin, repo, revision, e) from e
    return HubRevision(repo, commit, dict(sorted(files.items())))


def download(revision: HubRevision, cache_dir: Path, digests: FileDigests, *, origin: str = "source.model",
             verify: bool = False, warn: Callable[[str], None] | None = None,
             only: tuple[str, ...] | None = None) -> Path:
    """Fetch the bake's files (or `only` those of them) at the resolved commit into the hub cache; returns the
    snapshot directory, every file of which has the hub's digest (checked by stamps, or by hashing with `verify`)."""
    if only is not None:
        revision = replace(revision, files={p: d for p, d in revision.files.items() if p in only})
    patterns = list(only) if only is not None else HUB_PATTERNS
    for attempt in (1, 2):
        snapshot = _download_once(revision, cache_dir, digests, origin, patterns)
        damaged = _damaged_files(snapshot, revision, digests, verify)
        if not damaged:
            return snapshot
        for path in damaged:  # the next attempt fetches them again
            for bad in (Path(os.path.realpath(snapshot / path)), snapshot / path):
                with contextlib.suppress(OSError):
                    bad.unlink()
        if attempt == 1 and warn is not None:
            warn(f"{origin}: {revision.repo!r} at {revision.commit}: {', '.join(damaged)} in the hub cache "
                 "differs from the hub's digest (damaged since it was downloaded?); fetching it again")
    raise BuildError(f"{origin}: {revision.repo!r} at {revision.commit}: {', '.join(damaged)} is missing or "
                     "differs from the hub's after download; run again, or set HF_ENDPOINT to another mirror")


def _download_once(revision: HubRevision, cache_dir: Path, digests: FileDigests, origin: str,
                   patterns: list[str]) -> Path:
    hub = _hub()
    try:
        for path, digest in revision.files.items():
            if digest.startswith("sha256:"):
                _fetch_lfs_file(revision, path, cache_dir, digests, origin)
        return _with_retries(lambda: Path(hub.snapshot_download(
            revision.repo, revision=revision.commit, cache_dir=cache_dir, allow_patterns=patterns,
            endpoint=_endpoint())))
    except So8tError:
        raise
    except Exception as e:
        raise _translate(origin, revision.repo, revision.commit, e) from e


def _with_retries(call: Callable[[], T]) -> T:
    """`call()`, again after a transport error (a reset, a timeout), ATTEMPTS_WITHOUT_PROGRESS times in all: for
    snapshot_download, whose files are small once the LFS files are in place, and start again from byte 0."""
    for attempt in range(ATTEMPTS_WITHOUT_PROGRESS - 1):
        try:
            return call()
        except _transport_errors():
            retry_sleep(RETRY_PAUSE_S * 2 ** attempt)
    return call()


# --- LFS files: resumable, verified --------------------------------------------------------------------------

def _fetch_lfs_file(revision: HubRevision, path: str, cache_dir: Path, digests: FileDigests, origin: str) -> None:
    """Put an LFS file (its digest `sha256:<hex>` in `revision.files`) into huggingface_hub's blob store (named by
    its ETag, the sha256), resuming what earlier attempts and runs left in `.partial/<sha256>`; a file whose
    sha256 is not the hub's never gets there."""
    hub = _hub()
    sha256 = revision.files[path].removeprefix("sha256:")  # 64 hex digits: checked when the revision was resolved
    blob = cache_dir / cache_repo_dir_name(revision.repo) / "blobs" / sha256  # never a path of the hub's choosing
    if blob.exists():
        return
    url = hub.hf_hub_url(revision.repo, path, revision=revision.commit, endpoint=_endpoint())
    meta = hub.get_hf_file_metadata(url, endpoint=_endpoint())  # a HEAD: where the bytes are (the CDN), size, ETag
    if meta.etag is not None and meta.etag != sha256:
        raise HubAnswerError(f"{origin}: {revision.repo!r}: {path}: the hub's ETag {meta.etag[:80]!r} is not the "
                             "sha256 its metadata lists; refusing the file (check HF_ENDPOINT)")
    if meta.size is None:  # no size to resume against: snapshot_download fetches it
        return
    headers = {**hub.utils.build_hf_headers(), "Accept-Encoding": "identity"}
    if urlsplit(meta.location)[:2] != urlsplit(url)[:2]:
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the hub
    what = f"{origin}: {revision.repo!r}: {path}"
    partial = cache_dir / PARTIAL_DIR / sha256
    partial.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{partial}.lock"):
        # What an earlier run left may not be a prefix of this file (a crash, a disk): then once more from byte 0.
        for _ in range(2 if _size(partial) else 1):
            if blob.exists():  # another process stored it while this one waited
                return
            _download_resuming(meta.location, headers, partial, meta.size, what)
            if sha256_file(partial) == sha256:
                blob.parent.mkdir(parents=True, exist_ok=True)
                os.replace(partial, blob)
                # Verified under the lock, before the rename: the next use checks its stamp, not its bytes.
                digests.record(blob, sha256, _SHA256, exclusive=True)
                return
            partial.unlink()
    raise BuildError(f"{what}: the file downloaded does not have the sha256 the hub lists for it; run again, or set "
                     "HF_ENDPOINT to another mirror")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _download_resuming(url: str, headers: dict[str, str], partial: Path, size: int, what: str) -> None:
    """Append to `partial` until it holds `size` bytes. Attempts go on while they add bytes; after
    ATTEMPTS_WITHOUT_PROGRESS that add none, the run gives up and leaves the bytes for the next one."""
    if _size(partial) > size:
        partial.unlink()
    stalled = 0
    while (have := _size(partial)) < size:
        try:
            _append_rest(url, headers, partial, have)
            continue
        except _transport_errors() as e:
            error = e
        stalled = 0 if _size(partial) > have else stalled + 1
        if stalled >= ATTEMPTS_WITHOUT_PROGRESS:
            raise HubDownloadError(
                f"{what}: the download was interrupted {stalled} times in a row ({type(error).__name__}); "
                f"{_size(partial) / MIB:.1f} of {size / MIB:.1f} MiB are kept and the next run resumes from there: "
                "run again, or set HF_ENDPOINT to a mirror") from error
        if stalled:
            retry_sleep(RETRY_PAUSE_S * 2 ** (stalled - 1))
    if _size(partial) != size:
        partial.unlink()
        raise BuildError(f"{what}: the hub sent more bytes than it lists for the file; run again, or set HF_ENDPOINT "
                         "to another mirror")


def _append_rest(url: str, headers: dict[str, str], partial: Path, have: int) -> None:
    """One GET of the bytes from `have` on, written as they arrive, so a cut keeps all that came."""
    hub = _hub()
    ranged = {**headers, "Range": f"bytes={have}-"} if have else headers
    timeout = hub.constants.HF_HUB_DOWNLOAD_TIMEOUT
    with hub.utils.get_session().stream("GET", url, headers=ranged, timeout=timeout) as response:
        hub.utils.hf_raise_for_status(response)
        # A server that ignores the Range answers 200 with the whole file: start over rather than append.
        with partial.open("ab" if response.status_code == 206 else "wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _damaged_files(snapshot: Path, revision: HubRevision, digests: FileDigests, verify: bool) -> list[str]:
    """The files of the snapshot that are missing or do not have the hub's digest. An LFS file whose stamp (size,
    mtime, inode, ctime) was recorded with its sha256 is taken as it is, unless `verify`; small files are always
    hashed."""
    damaged = []
    for path, digest in revision.files.items():
        local = snapshot / path
        kind, _, expected = digest.partition(":")
        if not local.is_file():
            damaged.append(path)
        elif kind == "sha256":
            if verify or digests.known(local, _SHA256) != expected:
                actual = sha256_file(local)
                if actual != expected:
                    damaged.append(path)
                else:
                    digests.record(local, actual, _SHA256)
        elif _git_blob_id(local) != expected:
            damaged.append(path)
    return damaged


# -- huggingface_hub's cache layout: models--ORG--NAME/{blobs/HASH, refs/REV, snapshots/COMMIT/FILE -> blobs} ------

_REPO_DIR_PREFIX = "models--"


def cache_repo_dir_name(repo: str) -> str:
    """The directory huggingface_hub caches `repo` in."""
    return _REPO_DIR_PREFIX + repo.replace("/", "--")


def cached_repo_id(path: Path) -> str | None:
    """The repo id of a path inside a hub cache (…/models--org--name/snapshots/COMMIT/…), or None."""
    part = next((p for p in path.parts if p.startswith(_REPO_DIR_PREFIX)), None)
    return part.removeprefix(_REPO_DIR_PREFIX).replace("--", "/") if part else None


def snapshot_blobs(snapshot: Path) -> Path | None:
    """The blob store the files of a hub cache snapshot directory link into; None if `snapshot` is not one."""
    repo = snapshot.parent.parent
    if snapshot.parent.name == "snapshots" and repo.name.startswith(_REPO_DIR_PREFIX) and (repo / "blobs").is_dir():
        return repo / "blobs"
    return None
