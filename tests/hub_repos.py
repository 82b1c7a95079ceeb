"""Model repos on disk, in the layout that tests/hub_server.py serves: commits, branches, tags, LFS objects, access.

    ROOT/<org>/<name>/
      repo.json           {"branches": {name: sha}, "tags": {name: sha}, "gated": false | "auto" | "manual",
                           "tokens": [...], "created_at": "..."}
      commits/<sha>.json  {"parent": sha | null, "message": "...", "date": "...", "files": {path: {"size": n,
                           "oid": git blob id, "lfs": null | {"oid": sha256, "size": n, "pointerSize": n}}}}
      blobs/<git blob id> a regular file's content
      lfs/<sha256>        an LFS file's content (what the LFS storage serves, by its sha256)

A commit is an immutable manifest of paths and content hashes, so the hashes the Hub reports are computed once, here.
Which files are LFS follows the commit's .gitattributes, as on the Hub; a new repo gets the Hub's default one.
Branches and tags are names in repo.json: a test moves a branch by rewriting it, atomically, so a server reading it
at the same time sees the old or the new head. The last section builds the Hub API's JSON about a repo.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

CHUNK = 1 << 20
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# The LFS patterns of the .gitattributes the Hub writes into every new repo (a subset: the model formats).
DEFAULT_LFS_PATTERNS = ("*.bin", "*.ckpt", "*.gguf", "*.h5", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx",
                        "*.ot", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors", "*.tar", "*.zip",
                        "*tfevents*")
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_LFS_PATTERNS).encode()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def git_blob_id(data: bytes) -> str:
    """The id git gives a file: sha1 of "blob <size>\\0" + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores in place of an LFS file (its git blob id is the file's `oid` on the Hub)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def lfs_patterns(gitattributes: bytes) -> list[str]:
    return [line.split()[0] for line in gitattributes.decode().splitlines()
            if line.strip() and not line.startswith("#") and "filter=lfs" in line.split()[1:]]


def is_lfs(path: str, patterns: list[str]) -> bool:
    """gitattributes matching: a pattern without a slash matches the file name at any depth."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in p else name, p.lstrip("/")) for p in patterns)


def folder_files(folder: Path) -> dict[str, Path]:
    """A local folder's files by repo path."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _hash_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _write_json(path: Path, data: dict) -> None:
    """Write then rename: the server reads these files while tests change them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class HubRepo:
    """One repo: read by the server, written by tests (create, commit, set_branch, tag, gate)."""

    def __init__(self, root: Path, repo_id: str):
        if not REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id:
            raise ValueError(f"repo id must be 'org/name', got {repo_id!r}")
        self.repo_id, self.dir = repo_id, Path(root) / repo_id

    # -- reading --

    def exists(self) -> bool:
        return (self.dir / "repo.json").is_file()

    def state(self) -> dict:
        return json.loads((self.dir / "repo.json").read_text())

    def resolve(self, revision: str) -> str | None:
        """A branch, a tag or a full commit sha -> the commit sha; None if it names nothing."""
        state = self.state()
        if revision in state["branches"]:
            return state["branches"][revision]
        if revision in state["tags"]:
            return state["tags"][revision]
        if COMMIT_RE.fullmatch(revision) and (self.dir / "commits" / f"{revision}.json").is_file():
            return revision
        return None

    def commit_info(self, sha: str) -> dict:
        return json.loads((self.dir / "commits" / f"{sha}.json").read_text())

    def files(self, revision: str = "main") -> dict[str, dict]:
        sha = self.resolve(revision)
        if sha is None:
            raise KeyError(f"{self.repo_id}: no revision {revision!r}")
        return self.commit_info(sha)["files"]

    def content_path(self, entry: dict) -> Path:
        return self.dir / "lfs" / entry["lfs"]["oid"] if entry["lfs"] else self.dir / "blobs" / entry["oid"]

    def lfs_object(self, sha256: str) -> Path | None:
        path = self.dir / "lfs" / sha256
        return path if re.fullmatch(r"[0-9a-f]{64}", sha256) and path.is_file() else None

    def read(self, path: str, revision: str = "main") -> bytes:
        return self.content_path(self.files(revision)[path]).read_bytes()

    # -- writing --

    def create(self, *, exist_ok: bool = False) -> HubRepo:
        if self.exists():
            if exist_ok:
                return self
            raise FileExistsError(f"repo {self.repo_id} exists")
        _write_json(self.dir / "repo.json", {"branches": {}, "tags": {}, "gated": False, "tokens": [],
                                             "created_at": now_iso()})
        return self

    def commit(self, files: Mapping[str, bytes | str | Path | None], *, branch: str = "main", message: str = "",
               replace: bool = False) -> str:
        """Commit on top of `branch` (created if missing): each path gets bytes, text or a local file's content;
        None deletes it; `replace` starts from an empty tree. Moves the branch and returns the new commit sha."""
        state = self.state()
        parent = state["branches"].get(branch)
        manifest = {} if replace or parent is None else dict(self.commit_info(parent)["files"])
        if parent is None and ".gitattributes" not in files:
            files = {".gitattributes": DEFAULT_GITATTRIBUTES, **files}
        attrs = files.get(".gitattributes")
        if attrs is None and ".gitattributes" in manifest:
            attrs = self.content_path(manifest[".gitattributes"])
        patterns = lfs_patterns(_as_bytes(attrs)) if attrs is not None else []
        for path, content in files.items():
            if content is None:
                manifest.pop(path, None)
            else:
                manifest[path] = self._store(path, content, patterns)
        info = {"parent": parent, "message": message or f"Update {len(files)} files", "files": manifest}
        sha = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()
        _write_json(self.dir / "commits" / f"{sha}.json", {**info, "date": now_iso()})
        self.set_branch(branch, sha)
        return sha

    def upload_folder(self, folder: Path, *, branch: str = "main", message: str = "") -> str:
        """Commit a local folder as the whole tree of `branch` (with the default .gitattributes if it has none)."""
        files: dict[str, bytes | str | Path | None] = dict(folder_files(folder))
        files.setdefault(".gitattributes", DEFAULT_GITATTRIBUTES)
        return self.commit(files, branch=branch, message=message or f"Upload {Path(folder).name}", replace=True)

    def set_branch(self, name: str, revision: str) -> None:
        """Point a branch (new or existing) at a revision: how a test makes a branch move under a client."""
        self._set_ref("branches", name, revision)

    def tag(self, name: str, revision: str = "main") -> None:
        self._set_ref("tags", name, revision)

    def gate(self, tokens: list[str], mode: str = "manual") -> None:
        """Make the repo gated: files need `Authorization: Bearer <one of tokens>`; metadata stays public."""
        self._update(gated=mode, tokens=list(tokens))

    def ungate(self) -> None:
        self._update(gated=False, tokens=[])

    def _set_ref(self, kind: str, name: str, revision: str) -> None:
        sha = self.resolve(revision)
        if sha is None:
            raise KeyError(f"{self.repo_id}: no revision {revision!r}")
        state = self.state()
        state[kind][name] = sha
        _write_json(self.dir / "repo.json", state)

    def _update(self, **changes) -> None:
        _write_json(self.dir / "repo.json", {**self.state(), **changes})

    def _store(self, path: str, content: bytes | str | Path, patterns: list[str]) -> dict:
        if isinstance(content, str):
            content = content.encode()
        if isinstance(content, bytes):
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            source, owned = Path(tmp), True
        else:
            source, owned = Path(content), False
        try:
            sha256, size = _hash_file(source)
            if is_lfs(path, patterns):
                pointer = lfs_pointer(sha256, size)
                entry = {"size": size, "oid": git_blob_id(pointer),
                         "lfs": {"oid": sha256, "size": size, "pointerSize": len(pointer)}}
            else:
                entry = {"size": size, "oid": git_blob_id(source.read_bytes()), "lfs": None}
            target = self.content_path(entry)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
                os.close(fd)
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            return entry
        finally:
            if owned:
                source.unlink()


def _as_bytes(content: bytes | str | Path) -> bytes:
    if isinstance(content, Path):
        return content.read_bytes()
    return content.encode() if isinstance(content, str) else content


class LocalHub:
    """The repos under one root: LocalHub(root).create_repo("org/name") -> HubRepo."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def repo(self, repo_id: str) -> HubRepo:
        return HubRepo(self.root, repo_id)

    def create_repo(self, repo_id: str, *, exist_ok: bool = False) -> HubRepo:
        return self.repo(repo_id).create(exist_ok=exist_ok)


# --- what the Hub's API says about a repo ---------------------------------------------------------------------------

def file_entry(path: str, entry: dict) -> dict:
    out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        out["lfs"] = dict(entry["lfs"])
    return out


def dir_entry(path: str, files: dict) -> dict:
    """A folder; its oid stands in for git's tree id (a hash of what is under it)."""
    under = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1(json.dumps(under).encode()).hexdigest(), "size": 0, "path": path}


def tree_entries(files: dict, base: str, recursive: bool) -> list[dict]:
    """/tree/{rev}/{base}: the folder's files and folders, or everything under it; KeyError if no such folder."""
    prefix = base.strip("/") + "/" if base.strip("/") else ""
    if prefix and not any(p.startswith(prefix) for p in files):
        raise KeyError(base)
    out: dict[str, dict] = {}
    for path in files:
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            folder = prefix + "/".join(parts[:depth])
            out.setdefault(folder, dir_entry(folder, files))
        if recursive or len(parts) == 1:
            out[path] = file_entry(path, files[path])
    return [out[p] for p in sorted(out)]


def safetensors_summary(repo: HubRepo, files: dict) -> dict | None:
    """The Hub's `safetensors` field: parameter counts by dtype, read from the files' headers."""
    counts: dict[str, int] = {}
    for path, entry in files.items():
        if not path.endswith(".safetensors") or entry["size"] < 8:
            continue
        with repo.content_path(entry).open("rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            try:  # a test may publish bytes that are not a safetensors file: the Hub then reports nothing
                header = json.loads(f.read(length)) if length < entry["size"] else {}
            except ValueError:
                header = {}
        for name, tensor in header.items():
            if name != "__metadata__":
                counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + math.prod(tensor["shape"])
    return {"parameters": counts, "total": sum(counts.values())} if counts else None


def model_info(repo: HubRepo, sha: str, blobs: bool) -> dict:
    state, commit = repo.state(), repo.commit_info(sha)
    files = commit["files"]
    siblings = []
    for path in sorted(files):
        sibling: dict = {"rfilename": path}
        if blobs:
            entry = files[path]
            sibling.update(size=entry["size"], blobId=entry["oid"])
            if entry["lfs"]:
                sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["lfs"]["size"],
                                  "pointerSize": entry["lfs"]["pointerSize"]}
        siblings.append(sibling)
    config = {}
    if "config.json" in files:
        with contextlib.suppress(ValueError):
            raw = json.loads(repo.content_path(files["config.json"]).read_text())
            config = {k: raw[k] for k in ("architectures", "model_type") if k in raw}
    org = repo.repo_id.split("/")[0]
    return {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "modelId": repo.repo_id, "author": org, "sha": sha, "lastModified": commit["date"],
            "createdAt": state["created_at"], "private": False, "gated": state["gated"], "disabled": False,
            "downloads": 0, "likes": 0, "library_name": "transformers", "tags": ["transformers", "safetensors"],
            "pipeline_tag": "text-generation", "config": config, "siblings": siblings, "spaces": [],
            "safetensors": safetensors_summary(repo, files),
            "usedStorage": sum(e["size"] for e in files.values())}


def refs(repo: HubRepo) -> dict:
    state = repo.state()

    def refs_of(kind: str, prefix: str) -> list[dict]:
        return [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": sha} for n, sha in sorted(state[kind].items())]

    return {"branches": refs_of("branches", "heads"), "tags": refs_of("tags", "tags"), "converts": [],
            "pullRequests": []}
