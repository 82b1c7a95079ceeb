"""One tag as an Ollama image: the manifest, config and layers `ollama push` would write, made from what a create
sends (server/images.go, server/create.go, types/model/config.go of ollama/ollama).

A host that pulls it stores the manifest's bytes as they are (PullModel writes the raw manifest), so the digest
/api/tags lists for the pulled tag, and for every copy of it, is the digest of the manifest published here. Every
field is derived from content, never from the time or the machine: the same build gives the same image digest
from any machine, and publishing it again changes nothing.

Provenance rides in the manifest's annotations: the GGUF's sha256, the build and bake keys (the so8t.* keys in
the GGUF itself carry the rest), and the digest of the rendered Modelfile.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..external.gguf_info import GgufInfo
from ..external.registry import MANIFEST_MEDIA_TYPE
from ..manifest.deploy_schema import Registry
from ..manifest.quant_types import QUANT_TYPES

MEDIA = "application/vnd.ollama.image."
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
ANNOTATION = "dev.so8t."  # the prefix of this project's annotation keys


@dataclass(frozen=True)
class ImageBlob:
    media_type: str
    digest: str
    size: int
    data: bytes | None = None  # the small layers and the config
    path: Path | None = None  # the GGUF

    @property
    def source(self) -> Path | bytes:
        source = self.data if self.data is not None else self.path
        if source is None:
            raise ValueError(f"{self.digest}: no content")
        return source

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class OllamaImage:
    tag: str  # name:tag, as the manifest names it
    repository: str  # NAMESPACE/NAME in the registry
    reference: str  # HOST/NAMESPACE/NAME:TAG, what a host pulls
    config: ImageBlob
    layers: tuple[ImageBlob, ...]
    manifest: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def registry_tag(self) -> str:
        return self.tag.split(":", 1)[1]

    @property
    def blobs(self) -> tuple[ImageBlob, ...]:
        return (*self.layers, self.config)


def repository(registry: Registry, name: str) -> str:
    return f"{registry.namespace}/{name}"


def registry_reference(registry: Registry, tag: str) -> str:
    """What a host pulls for `tag` (name:tag): HOST/NAMESPACE/NAME:TAG, an Ollama model name of its own."""
    return f"{registry.host}/{registry.namespace}/{tag}"


def _text_blob(media: str, data: bytes) -> ImageBlob:
    return ImageBlob(media_type=media, digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data), data=data)


def parameter_size(count: int) -> str:
    """Ollama's format.HumanNumber: what /api/tags shows as parameter_size (`3.8B`, `494.03M`, `46K`)."""
    for unit, scale, decimals in (("B", 10**9, 1), ("M", 10**6, 2)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    return f"{count / 1000:.0f}K" if count >= 1000 else str(count)


def file_type_name(file_type: int | None) -> str:
    """The GGUF's general.file_type as Ollama names it (`Q4_K_M`, `F16`)."""
    return next((q.name.upper() for q in QUANT_TYPES.values() if q.ftype == file_type), "unknown")


@dataclass(frozen=True)
class ImageContent:
    """What an image holds: the GGUF (its file, sha256 and header facts), then the Modelfile's template, system
    prompt and parameters."""

    gguf: Path
    gguf_sha256: str
    info: GgufInfo
    template: str
    system: str | None
    parameters: dict[str, object]


def build_image(registry: Registry, tag: str, content: ImageContent, annotations: dict[str, str]) -> OllamaImage:
    """The image of one tag: the GGUF as its model layer, then template, system and params, as a create makes."""
    gguf, info = content.gguf, content.info
    layers = [ImageBlob(media_type=MEDIA + "model", digest=f"sha256:{content.gguf_sha256}",
                        size=gguf.stat().st_size, path=gguf)]
    if content.template:
        layers.append(_text_blob(MEDIA + "template", content.template.encode()))
    if content.system:
        layers.append(_text_blob(MEDIA + "system", content.system.encode()))
    if content.parameters:
        layers.append(_text_blob(MEDIA + "params", json.dumps(content.parameters, sort_keys=True).encode()))
    family = info.architecture or "unknown"
    config = {"model_format": "gguf", "model_family": family, "model_families": [family],
              "model_type": parameter_size(info.n_params), "file_type": file_type_name(info.file_type),
              "architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]}}
    config_blob = _text_blob(CONFIG_MEDIA_TYPE, json.dumps(config, separators=(",", ":")).encode())
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config_blob.descriptor(),
                "layers": [layer.descriptor() for layer in layers],
                "annotations": {ANNOTATION + key: value for key, value in sorted(annotations.items())}}
    return OllamaImage(tag=tag, repository=repository(registry, tag.split(":", 1)[0]),
                       reference=registry_reference(registry, tag), config=config_blob, layers=tuple(layers),
                       manifest=json.dumps(manifest, separators=(",", ":")).encode())
