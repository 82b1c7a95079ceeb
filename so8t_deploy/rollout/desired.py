"""The desired state of every host: one model per tag, its rendered Modelfile and what identifies its GGUF.

Known before anything is built: the template, system prompt and parameters (rendered from the
manifest, always: a saved plan carries only the digest of each Modelfile) and the GGUF keys that
identify its bytes (from the build keys). Known once built: the GGUF itself, its sha256 and size,
which an upload and a create need.

Each tag has three companions on a host, all in the manifest's own name:
- `TAG-candidate`: the new model, created and smoke-tested under this name before it goes live;
- `TAG-rollback`: the live model while this run promotes candidates, until the host converged;
- `TAG-prev`: the previous verified model, kept after a rollout converged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..build.pipeline import BuiltArtifact
from ..build.plan import BuildPlan
from ..chat.fidelity import ExpectedRender
from ..chat.setup import ChatSetup
from ..errors import BuildError
from ..fsutil import symlink_atomic, write_atomic
from ..manifest.schema import Manifest
from .render import render_modelfile

# No quant level ends like these, so a companion tag never shadows a real one (manifest.TAG_SUFFIXES).
BACKUP_SUFFIX = "-prev"  # the tag's previous verified model, kept after a rollout converged
ROLLBACK_SUFFIX = "-rollback"  # the tag's model while this run promotes a candidate, until the host converged
CANDIDATE_SUFFIX = "-candidate"  # the new model while it is smoke-tested: never served under the live tag
COMPANION_SUFFIXES = (BACKUP_SUFFIX, ROLLBACK_SUFFIX, CANDIDATE_SUFFIX)


@dataclass(frozen=True)
class PublishedImage:
    reference: str  # HOST/NAMESPACE/NAME:TAG, an Ollama model name
    digest: str  # the manifest's: what a host that pulled it lists


@dataclass(frozen=True)
class DesiredModel:
    tag: str
    gguf_name: str
    template: str
    system: str | None
    parameters: dict[str, Any] = field(default_factory=dict)
    modelfile_digest: str = ""  # sha256 of the rendered Modelfile: what a saved plan pins ("" until known)
    expected_renders: tuple[ExpectedRender, ...] = ()  # what a host must render for the fixed conversations
    capabilities: tuple[str, ...] = ()  # what a host must list for it (the model's template has tools, thinking)
    identity: dict[str, str] | None = None  # GGUF keys that identify its bytes; None if not known yet
    build_key: str | None = None  # the cache key of the step that makes its GGUF (provenance)
    image: PublishedImage | None = None  # in registry mode, once published: what every host pulls
    gguf: Path | None = None  # once built
    sha256: str | None = None  # once built
    size: int | None = None  # once built

    @property
    def digest(self) -> str:
        if self.sha256 is None:
            raise ValueError(f"{self.tag}: not built yet")
        return f"sha256:{self.sha256}"

    @property
    def backup_tag(self) -> str:
        return self.tag + BACKUP_SUFFIX

    @property
    def rollback_tag(self) -> str:
        return self.tag + ROLLBACK_SUFFIX

    @property
    def candidate_tag(self) -> str:
        return self.tag + CANDIDATE_SUFFIX

    @property
    def spec_digest(self) -> str | None:
        """Everything a create sends: equal digests mean an identical model (None until built)."""
        if self.sha256 is None:
            return None
        spec = {"gguf": self.sha256, "template": self.template, "system": self.system,
                "parameters": self.parameters}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def built_file(self) -> tuple[Path, str, int]:
        """(path, digest, size) of the GGUF; only a built model can be uploaded or created."""
        if self.gguf is None or self.sha256 is None or self.size is None:
            raise BuildError(f"{self.tag}: its GGUF is not built (internal: create needs the built file)")
        return self.gguf, self.digest, self.size

    def built(self, artifact: BuiltArtifact) -> DesiredModel:
        return replace(self, gguf=artifact.path, sha256=artifact.sha256, size=artifact.size)


def desired_models(manifest: Manifest, plan: BuildPlan, chat: ChatSetup) -> list[DesiredModel]:
    """One model per tag, from the manifest, the build plan and the chat setup; GGUFs already built are filled
    in. With the chat setup not known yet (`auto` before a hub model's files are here), the Modelfile is too."""
    models = []
    for tag in plan.tags:
        model = DesiredModel(tag=tag.tag, gguf_name=tag.file_name, template="", system=manifest.modelfile.system,
                             identity=tag.identity, build_key=tag.key)
        if chat.known:
            rendered = render_modelfile(manifest.modelfile, Path(tag.file_name), chat)
            model = replace(model, template=rendered.template, system=rendered.system,
                            parameters=rendered.parameters,
                            modelfile_digest=hashlib.sha256(rendered.text.encode()).hexdigest(),
                            expected_renders=chat.expected, capabilities=chat.capabilities)
        if tag.record is not None:
            model = replace(model, sha256=tag.record.sha256, size=tag.record.size)
        models.append(model)
    return models


def write_release(releases: Path, manifest: Manifest, artifact: BuiltArtifact, chat: ChatSetup) -> Path:
    """releases/NAME/TAG/: the GGUF (a link into the workspace) and its Modelfile, for `ollama create -f`."""
    rendered = render_modelfile(manifest.modelfile, artifact.path, chat)
    release_dir = releases / manifest.name / artifact.tag.split(":", 1)[1]
    symlink_atomic(release_dir / artifact.path.name, artifact.path)
    modelfile = release_dir / "Modelfile"
    if not modelfile.is_file() or modelfile.read_text(encoding="utf-8") != rendered.text:
        write_atomic(modelfile, rendered.text)
    return release_dir
