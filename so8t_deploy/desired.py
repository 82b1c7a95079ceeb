"""The desired state of every host: one model per tag, from the build's GGUFs and rendered Modelfiles."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build import BuildReport
from .manifest import Manifest
from .render import render_modelfile

# No quant level ends like these, so a backup tag never shadows a real one (manifest.TAG_SUFFIXES).
BACKUP_SUFFIX = "-prev"  # the tag's previous verified model, kept after a rollout converged
ROLLBACK_SUFFIX = "-rollback"  # the tag's model while this run replaces it, until the host converged


@dataclass(frozen=True)
class DesiredModel:
    tag: str
    gguf: Path
    gguf_sha256: str
    size: int
    template: str
    system: str | None
    parameters: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, str] = field(default_factory=dict)  # GGUF keys that identify its bytes

    @property
    def digest(self) -> str:
        return f"sha256:{self.gguf_sha256}"

    @property
    def backup_tag(self) -> str:
        return self.tag + BACKUP_SUFFIX

    @property
    def rollback_tag(self) -> str:
        return self.tag + ROLLBACK_SUFFIX

    @property
    def spec_digest(self) -> str:
        """Everything a create sends: equal digests mean an identical model."""
        spec = {"gguf": self.gguf_sha256, "template": self.template, "system": self.system,
                "parameters": self.parameters}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _write_release(release_dir: Path, gguf: Path, modelfile: str) -> None:
    """A directory per tag with the GGUF (a link into the cache) and its Modelfile, for `ollama create -f`."""
    release_dir.mkdir(parents=True, exist_ok=True)
    link = release_dir / gguf.name
    if not (link.is_symlink() and os.readlink(link) == str(gguf)):
        tmp = release_dir / f".{gguf.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(gguf)
        tmp.replace(link)
    target = release_dir / "Modelfile"
    if not target.is_file() or target.read_text(encoding="utf-8") != modelfile:
        tmp = release_dir / f".Modelfile.{os.getpid()}"
        tmp.write_text(modelfile, encoding="utf-8")
        tmp.replace(target)


def desired_models(manifest: Manifest, build: BuildReport, releases: Path | None) -> list[DesiredModel]:
    """One model per built tag; with `releases`, also a directory per tag with its Modelfile."""
    from .external.gguf_info import read_gguf_info

    models = []
    for artifact in build.artifacts:
        rendered = render_modelfile(manifest.modelfile, artifact.path)
        if releases is not None:
            _write_release(releases / manifest.name / artifact.tag.split(":", 1)[1], artifact.path, rendered.text)
        info = read_gguf_info(artifact.path)
        identity = {k: v for k, v in info.metadata.items() if k in ("so8t.bake_key", "so8t.llama_cpp")}
        identity["general.file_type"] = str(info.file_type)
        models.append(DesiredModel(tag=artifact.tag, gguf=artifact.path, gguf_sha256=artifact.sha256,
                                   size=artifact.size, template=rendered.template, system=rendered.system,
                                   parameters=rendered.parameters, identity=identity))
    return models
