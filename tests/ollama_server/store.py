"""Ollama's models directory (manifest/ and the blob parts of server/images.go): blobs, manifests, pruning."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.gotemplate.gofmt import go_json

from .common import ApiError
from .names import ModelName

MEDIA = "application/vnd.ollama.image."
MODEL_MEDIA = MEDIA + "model"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"
DIGEST_RE = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
PRUNE_GRACE_S = 3600.0  # server/images.go layerPruneGracePeriod


# --- storage (manifest/) --------------------------------------------------------------------------------

@dataclass
class Layer:
    media_type: str
    digest: str
    size: int
    source: str = ""  # the manifest's "from"
    status: str = ""  # the progress line a create sends for it (not stored)

    def to_json(self) -> dict:
        out = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.source:
            out["from"] = self.source
        return out

    @classmethod
    def from_json(cls, data: dict) -> Layer:
        return cls(data.get("mediaType", ""), data.get("digest", ""), int(data.get("size", 0)), data.get("from", ""))


@dataclass
class Manifest:
    name: ModelName
    config: Layer
    layers: list[Layer]
    digest: str  # sha256 of the manifest file, as /api/tags reports it
    mtime_ns: int

    @property
    def size(self) -> int:
        return sum(layer.size for layer in [*self.layers, self.config])

    def digests(self) -> set[str]:
        return {layer.digest for layer in [*self.layers, self.config] if layer.digest}


class Store:
    """Ollama's models directory: blobs/, manifests/, plus tmp/ for uploads and rewrites in progress."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs, self.manifests, self.tmp = root / "blobs", root / "manifests", root / "tmp"
        for d in (self.blobs, self.manifests, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # -- blobs --

    def blob_path(self, digest: str) -> Path:
        """manifest.BlobsPath: only sha256 digests; ':' becomes '-' (the case is kept)."""
        if not DIGEST_RE.fullmatch(digest or ""):
            raise ApiError(400, "invalid digest format")
        return self.blobs / digest.replace(":", "-")

    def new_temp(self, prefix: str = "upload-") -> Path:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=prefix)
        os.close(fd)
        return Path(name)

    def publish(self, tmp: Path, digest: str) -> bool:
        """Move a hashed temp file into blobs/ under its digest; False when the blob was there already."""
        target = self.blob_path(digest)
        with self.lock:
            existed = target.is_file()
            if existed:
                tmp.unlink()
            else:
                os.replace(tmp, target)
            os.utime(target)  # like Ollama, a blob a create touched is young again
        return existed

    def new_layer(self, chunks: Iterator[bytes], media_type: str) -> Layer:
        """manifest.NewLayer: copy into a temp file while hashing, then publish it."""
        tmp, h, size = self.new_temp("sha256-"), hashlib.sha256(), 0
        try:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        digest = "sha256:" + h.hexdigest()
        status = "using existing layer" if self.publish(tmp, digest) else "creating new layer"
        return Layer(media_type, digest, size, status=f"{status} {digest}")

    def bytes_layer(self, data: bytes, media_type: str) -> Layer:
        return self.new_layer(iter([data]), media_type)

    def existing_layer(self, digest: str, media_type: str, source: str) -> Layer:
        """manifest.NewLayerFromLayer: a layer for a blob that is already stored (touched, like Ollama)."""
        path = self.blob_path(digest)
        try:
            size = path.stat().st_size
            os.utime(path)
        except FileNotFoundError:
            raise ApiError(500, f"stat {path}: no such file or directory") from None
        return Layer(media_type, digest, size, source, status=f"using existing layer {digest}")

    def remove_blob_if_unused(self, layer: Layer) -> None:
        """Layer.Remove: delete the blob unless some manifest references it."""
        with self.lock:
            if not any(layer.digest in m.digests() for m in self.all()):
                with contextlib.suppress(FileNotFoundError, ApiError):
                    self.blob_path(layer.digest).unlink()

    # -- manifests --

    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests.joinpath(*name.parts())

    def read(self, name: ModelName) -> Manifest | None:
        path = self.manifest_path(name)
        try:
            data = path.read_bytes()
            mtime_ns = path.stat().st_mtime_ns
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        parsed = json.loads(data)
        return Manifest(name, Layer.from_json(parsed.get("config") or {}),
                        [Layer.from_json(layer) for layer in parsed.get("layers") or []],
                        hashlib.sha256(data).hexdigest(), mtime_ns)

    def all(self) -> list[Manifest]:
        """manifest.Manifests(true): every readable manifest four levels down, skipping bad ones."""
        found = []
        for path in sorted(self.manifests.glob("*/*/*/*")):
            name = ModelName(*path.relative_to(self.manifests).parts)
            if path.is_file() and name.is_valid():
                with contextlib.suppress(ValueError, OSError):
                    if (m := self.read(name)) is not None:
                        found.append(m)
        return found

    def existing_name(self, name: ModelName) -> ModelName:
        """getExistingName: adopt the spelling of any stored name whose part matches ignoring case."""
        parts = list(name.parts())
        for m in self.all():
            for i, part in enumerate(m.name.parts()):
                if part.lower() == parts[i].lower():
                    parts[i] = part
        return ModelName(*parts)

    def write(self, name: ModelName, config: Layer, layers: list[Layer]) -> None:
        """manifest.WriteManifest: the JSON Go's encoder writes, so its sha256 is the digest Ollama would list."""
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA, "config": config.to_json(),
                    "layers": [layer.to_json() for layer in layers]}
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.new_temp("manifest-")
        tmp.write_text(go_json(manifest, sort_keys=False) + "\n")
        os.replace(tmp, path)

    def write_raw(self, name: ModelName, data: bytes) -> None:
        """A pulled manifest: the bytes the registry sent (os.WriteFile in PullModel)."""
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.new_temp("manifest-")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def copy(self, src: ModelName, dst: ModelName) -> None:
        """CopyModel: the manifest file, byte for byte."""
        if self.manifest_path(src) == self.manifest_path(dst):
            return
        data = self.manifest_path(src).read_bytes()
        path = self.manifest_path(dst)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.new_temp("manifest-")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def delete(self, m: Manifest) -> None:
        """DeleteHandler: the manifest file, empty directories above it, then its now unused layers."""
        with self.lock:
            self.manifest_path(m.name).unlink()
            self._prune_directories(self.manifests)
            self.remove_layers(m)

    def remove_layers(self, m: Manifest) -> None:
        """Manifest.RemoveLayers: delete every blob of m that no (other) manifest references."""
        self.remove_unused(m.digests())

    def remove_unused(self, digests: set[str]) -> None:
        """deleteUnusedLayers: delete the blobs among `digests` that no manifest references."""
        with self.lock:
            used = set().union(*(other.digests() for other in self.all()))
            for digest in digests - used:
                with contextlib.suppress(FileNotFoundError, ApiError):
                    self.blob_path(digest).unlink()

    def prune(self, grace_s: float) -> int:
        """PruneLayers at start: blobs older than the grace period that no manifest references (and files whose
        name is not a digest) are removed."""
        with self.lock:
            now, removed = time.time(), 0
            candidates = []
            for path in self.blobs.iterdir():
                if path.is_dir() or now - path.stat().st_mtime < grace_s:
                    continue
                if DIGEST_RE.fullmatch(path.name.replace("-", ":")):
                    candidates.append(path)
                else:
                    path.unlink()
            used = {d.replace(":", "-") for m in self.all() for d in m.digests()}
            for path in candidates:
                if path.name not in used:
                    path.unlink()
                    removed += 1
            self._prune_directories(self.manifests)
            return removed

    def _prune_directories(self, path: Path) -> None:
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                self._prune_directories(child)
                with contextlib.suppress(OSError):
                    child.rmdir()  # only succeeds when empty
