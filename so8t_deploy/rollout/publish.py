"""Registry mode: publish each tag once as an Ollama image, so that every host pulls it instead of the controller
uploading it to each one.

A tag is published before any host is touched: its blobs (each skipped when the registry has it), then its
manifest (skipped when the registry holds exactly it). Then one blob is fetched the way Ollama's puller fetches
it (see RegistryClient.check_blob_answer): a registry whose answers Ollama cannot use is refused here,
with its fix, rather than by every host in the middle of a rollout. A run stopped half-way leaves only
content-addressed blobs, which the next run reuses; a tag's manifest is written last, so a tag never names an
image that is not whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pydantic import Field

from ..cancel import CancelToken
from ..errors import RegistryError
from ..external.gguf_info import read_gguf_info
from ..external.registry import RegistryClient, RegistryProbe
from ..manifest.deploy_schema import Registry
from ..progress import Progress
from .desired import DesiredModel, PublishedImage
from .image import ImageContent, OllamaImage, build_image, repository


class RegistryPlan(RegistryProbe):
    """What plan observed of the registry, and what apply would publish to it."""

    publish: dict[str, int | None] = Field(default_factory=dict)  # tag -> GGUF bytes to push (None: once built)

    @property
    def blocking(self) -> bool:
        """Hosts need a pull from a registry they cannot pull from: plan fails, apply refuses to start."""
        return self.problem is not None and bool(self.publish)


@dataclass
class PublishReport:
    registry: str
    published: list[str] = field(default_factory=list)  # tags whose manifest this run pushed
    present: list[str] = field(default_factory=list)  # tags the registry already held, exactly
    pushed_bytes: int = 0  # blob and manifest bytes sent to the registry
    digests: dict[str, str] = field(default_factory=dict)  # tag -> image (manifest) digest


def image_of(model: DesiredModel, registry: Registry) -> OllamaImage:
    """The image of a built model (its GGUF, template, system and parameters), with its provenance."""
    path, _, _ = model.built_file()
    identity = model.identity or {}
    annotations = {"gguf.sha256": model.sha256 or "", "build.key": model.build_key or "",
                   "bake.key": identity.get("so8t.bake_key", ""), "llama-cpp": identity.get("so8t.llama_cpp", ""),
                   "modelfile.sha256": model.modelfile_digest}
    content = ImageContent(path, model.sha256 or "", read_gguf_info(path), model.template, model.system,
                           model.parameters)
    return build_image(registry, model.tag, content, {k: v for k, v in annotations.items() if v})


def publish(registry: Registry, models: list[DesiredModel], progress: Progress, cancel: CancelToken,
            spellings: dict[str, set[str]] | None = None) -> tuple[PublishReport, dict[str, DesiredModel]]:
    """Publish every model (each built) and check that hosts can pull; the models with their images filled in.

    `spellings` names, per tag, the other spellings of its tag part that some host would request: Ollama reuses
    the spelling of any model it holds whose tag matches ignoring case (getExistingName: a host holding
    `hf.co/x:Q8_0` pulls `…:Q8_0` for `…:q8_0`), and registry tags are case-sensitive, so the manifest is also
    published under each of them."""
    report, published = PublishReport(registry=registry.url), {}
    with RegistryClient(registry) as client:
        images = [image_of(model, registry) for model in models]
        for model, image in zip(models, images, strict=True):
            cancel.check()
            if client.manifest_digest(image.repository, image.registry_tag) == image.digest:
                report.present.append(model.tag)
            else:
                progress.step(f"registry: publish {image.reference}")
                for blob in image.blobs:
                    cancel.check()
                    advance = progress.transfer(f"push {blob.digest[7:19]} to the registry", blob.size) \
                        if blob.path is not None else None
                    client.push_blob(image.repository, blob.digest, blob.size, blob.source, advance)
                client.put_manifest(image.repository, image.registry_tag, image.manifest)
                report.published.append(model.tag)
            for alias in sorted((spellings or {}).get(model.tag, set()) - {image.registry_tag}):
                if client.manifest_digest(image.repository, alias) != image.digest:
                    client.put_manifest(image.repository, alias, image.manifest)
            report.digests[model.tag] = image.digest
            published[model.tag] = replace(model, image=PublishedImage(image.reference, image.digest))
        if images:
            client.check_blob_answer(images[0].repository, images[0].config.digest)
        report.pushed_bytes = client.sent_bytes
    return report, published


def observe_registry(registry: Registry, name: str, models: list[DesiredModel], tags: set[str]) -> RegistryPlan:
    """The registry as hosts will see it (see RegistryClient.probe), and the GGUF bytes that publishing `tags` would
    push (0 where the registry has the blob); reads only."""
    repo = repository(registry, name)
    publish: dict[str, int | None] = {}
    with RegistryClient(registry) as client:
        known = None
        try:
            for model in models:  # a tag not to publish is asked about only while no blob of ours is known
                if model.tag not in tags and (known is not None or model.sha256 is None):
                    continue
                present = model.sha256 is not None and client.has_blob(repo, model.digest)
                known = known or (model.digest if present else None)
                if model.tag in tags:
                    publish[model.tag] = 0 if present else model.size
        except RegistryError:
            publish = {m.tag: m.size for m in models if m.tag in tags}  # the probe says why
        probe = client.probe(repo, known)
    return RegistryPlan(**probe.model_dump(), publish=publish)
