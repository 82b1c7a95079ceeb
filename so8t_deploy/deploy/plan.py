"""The DeployPlan: everything `apply` will do, computed without side effects, and saved as JSON.

It holds the build steps with their cache keys (and whether each is already built), per tag the
digest of its rendered Modelfile and the quality gate's verdict where it is known, per host
what it holds now and the decision for every tag, and in registry mode what the registry
answers (see rollout.publish) and what apply would publish to it. Computing it reads the manifest, hashes local
inputs (remembered in the workspace's digest cache), asks the hub for metadata and observes each
host: it never downloads weights, starts a container or changes a host.

A saved plan (`plan --out`) is input to check, like a manifest: `apply --plan` runs its build steps
once each has been held against the manifest and the inputs now, and derives everything else from
the manifest and what it observes now (see saved_plan); the plan may only pin and narrow that.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from pydantic import Field

from .. import __version__
from ..build.inputs import resolve_inputs
from ..build.plan import BuildInputs, BuildPlan, plan_builds
from ..build.provenance import llama_cpp_label
from ..chat.setup import resolve_chat
from ..errors import EXIT_DRIFT, EXIT_OK, EXIT_OPERATIONAL
from ..frozen import Frozen
from ..fsutil import write_atomic
from ..manifest.schema import Manifest
from ..progress import Progress
from ..quality.evaluate import cached_gate
from ..rollout.desired import DesiredModel, desired_models
from ..rollout.fleet import plan_hosts
from ..rollout.host_plan import ActionKind, HostPlan, TagKind, new_models
from ..rollout.publish import RegistryPlan, observe_registry
from ..store.workspace import Workspace

PLAN_FORMAT: Final = "so8t-deploy/plan-v3"


class PlannedTag(Frozen):
    tag: str
    gguf_name: str
    modelfile_digest: str  # sha256 of the rendered Modelfile, from the manifest; "" until the model's chat is known
    identity: dict[str, str] | None  # the GGUF keys a host's copy must report; None: unknown (see note)
    sha256: str | None  # once built
    size: int | None
    gate: list[str] | None  # why the quality gate holds it back ([] passes), None: not evaluated yet


class Action(Frozen):
    kind: ActionKind
    tag: str
    detail: str = ""
    bytes: int | None = 0  # None: not known until built


class DeployPlan(Frozen):
    format: Literal["so8t-deploy/plan-v3"] = PLAN_FORMAT
    manifest: str  # the manifest file the plan was made from
    name: str  # the manifest's model name
    manifest_digest: str  # of the validated manifest (header values excluded)
    created_at: str
    tool_version: str
    llama_cpp: str
    source: str  # the model as resolved: a local path, org/name@commit, or org/name while the hub is unknown
    hub_commit: str | None = None  # the commit a hub model resolved to: apply builds exactly it
    offline: bool = False  # made with --offline: no host observed, nothing for apply to check against
    note: str = ""  # why some keys are unknown
    builds: BuildPlan
    tags: list[PlannedTag]
    hosts: list[HostPlan] = Field(default_factory=list)
    registry: RegistryPlan | None = None  # registry mode: what was observed of it, and what apply publishes

    def planned(self, tag: str) -> PlannedTag:
        return next(t for t in self.tags if t.tag == tag)

    @property
    def unknown_keys(self) -> bool:
        return any(t.identity is None for t in self.tags)

    def actions(self, host: HostPlan) -> list[Action]:
        """The host's decisions as rows to read, in the order apply carries them out."""
        rows = [Action(kind=ActionKind.TIDY, tag=t, detail="left by an interrupted run") for t in host.tidy]
        for d in host.decisions:
            tag = self.planned(d.tag)
            if d.kind is TagKind.UNCHANGED:
                rows.append(Action(kind=ActionKind.UNCHANGED, tag=d.tag))
            elif d.kind is TagKind.VERIFY:
                rows.append(Action(kind=ActionKind.VERIFY, tag=d.tag, detail="an interrupted promotion: smoke-test "
                                   "the live tag, then keep it (or restore the older model)"))
            elif d.kind is TagKind.HELD:
                rows.append(Action(kind=ActionKind.HELD, tag=d.tag, detail="; ".join(tag.gate or [])))
            else:
                rows += _create_rows(d.tag, d.upload, d.reuse_candidate, d.observed_digest is not None, tag,
                                     pull=self.registry.repository if self.registry else None)
        rows += [Action(kind=ActionKind.DELETE, tag=t, detail="pruned") for t in host.deletes]
        return rows

    def upload_bytes(self, host: HostPlan) -> int | None:
        sizes = [a.bytes for a in self.actions(host) if a.kind is ActionKind.UPLOAD]
        return None if None in sizes else sum(s or 0 for s in sizes)

    @property
    def drifted(self) -> list[str]:
        """The targets where apply would change something (plan --check's drift)."""
        return [h.target for h in self.hosts if any(a.kind is not ActionKind.UNCHANGED for a in self.actions(h))]

    @property
    def drift(self) -> bool:
        return bool(self.drifted)

    def publish_rows(self) -> list[Action]:
        """Registry mode: the images apply publishes before any host pulls."""
        if self.registry is None:
            return []
        return [Action(kind=ActionKind.PUBLISH, tag=tag, bytes=size,
                       detail=f"{self.registry.repository}:{tag.split(':', 1)[1]}" + (
                           ", its GGUF already there" if size == 0 else "" if size else ", once built"))
                for tag, size in self.registry.publish.items()]

    @property
    def unobserved(self) -> list[str]:
        """What could not be observed: hosts that did not answer, the hub (keys unknown), a registry hosts could
        not pull from."""
        found = [f"{h.target}: {h.error}" for h in self.hosts if h.error]
        if self.registry is not None and self.registry.blocking:
            found.append(self.registry.problem or "")
        if self.note:
            found.append(f"the hub ({self.note})")
        return found

    @property
    def check_exit_code(self) -> int:
        """plan --check: 0 exactly when apply would change nothing and exit 0; 3 drift; 1 something not observed."""
        if self.unobserved:
            return EXIT_OPERATIONAL
        return EXIT_DRIFT if self.drift else EXIT_OK

    def save(self, path: Path) -> None:
        write_atomic(path, self.model_dump_json(indent=2) + "\n")


def _create_rows(tag: str, upload: bool | None, reuse: bool, live: bool, planned: PlannedTag, *,
                 pull: str | None = None) -> list[Action]:
    """A new model for `tag`: uploaded and created (push mode) or pulled from `pull`, the registry repository
    (registry mode), or an interrupted run's candidate reused; then promoted."""
    gate = "; quality gate pending" if planned.gate is None else ""
    rows = []
    if reuse:
        rows.append(Action(kind=ActionKind.CREATE, tag=tag, detail="reuse the candidate an interrupted run left"
                           + gate))
    elif pull is not None:
        rows.append(Action(kind=ActionKind.PULL, tag=tag,
                           detail=f"{pull}:{tag.split(':', 1)[1]} as {tag}-candidate{gate}"))
    else:
        if upload is None:
            rows.append(Action(kind=ActionKind.UPLOAD, tag=tag, detail="if missing once built", bytes=None))
        elif upload:
            rows.append(Action(kind=ActionKind.UPLOAD, tag=tag, detail=planned.gguf_name, bytes=planned.size))
        if planned.sha256:
            detail = f"as {tag}-candidate, sha256:{planned.sha256[:12]}"
        else:
            detail = f"as {tag}-candidate, " + ("after build" if planned.identity else
                                                "after build (key known after download)")
        rows.append(Action(kind=ActionKind.CREATE, tag=tag, detail=detail + gate))
    promote = f"once smoke-tested; the live model becomes {tag}-prev" if live else "once smoke-tested (a new tag)"
    rows.append(Action(kind=ActionKind.PROMOTE, tag=tag, detail=promote))
    return rows


def manifest_digest(manifest: Manifest) -> str:
    """What identifies a manifest's content; header values and the registry password (secrets) are left out,
    names kept."""
    data = manifest.model_dump(mode="json", by_alias=True)
    for target in data.get("targets", []):
        target["headers"] = sorted(target.get("headers", {}))
    quantize = data["quantize"]
    if quantize["imatrix"] is None and quantize["split_max_size"] is None:
        data["quantize"] = quantize["types"]  # the list it was before it could be a mapping: the digest stays
    if (registry := data["distribution"]["registry"]) is None:
        del data["distribution"]  # the default: a manifest's digest stays what it was before registry mode
    elif registry["auth"] is not None:
        registry["auth"]["password"] = None
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def planned_tags(models: list[DesiredModel], gate: dict[str, list[str] | None]) -> list[PlannedTag]:
    return [PlannedTag(tag=m.tag, gguf_name=m.gguf_name, modelfile_digest=m.modelfile_digest, identity=m.identity,
                       sha256=m.sha256, size=m.size, gate=gate[m.tag]) for m in models]


def derive_plan(manifest: Manifest, manifest_path: Path, workspace: Workspace, progress: Progress, *,
                offline: bool = False, inputs: BuildInputs | None = None,
                builds: BuildPlan | None = None) -> tuple[DeployPlan, list[DesiredModel]]:
    """The plan from the manifest and what the hub and every host report now, with the desired models it was
    derived from (each rendered once: the plan keeps only their Modelfile digests). `inputs`: already resolved
    (apply, pinned to a saved plan's hub commit); `builds`: a saved plan's build steps, checked against them
    (saved_plan.check_steps), which are then what this plan runs: they are not planned again."""
    if inputs is None:
        inputs = resolve_inputs(manifest, workspace, progress, download_model=False, manifest_path=manifest_path,
                                offline=offline)
    builds = plan_builds(manifest, inputs, workspace) if builds is None else builds.looked_up(workspace)
    models = desired_models(manifest, builds, resolve_chat(manifest.modelfile, inputs.chat_dir))
    gate = cached_gate(manifest, builds, workspace)
    held = {tag for tag, reasons in gate.items() if reasons}
    hosts = [h.gated(held) for h in plan_hosts(manifest, models, workspace)] if not offline else []
    registry = None
    if manifest.distribution.registry is not None and not offline:
        registry = observe_registry(manifest.distribution.registry, manifest.name, models, new_models(hosts))
    plan = DeployPlan(manifest=str(manifest_path), name=manifest.name, manifest_digest=manifest_digest(manifest),
                      created_at=datetime.now(UTC).isoformat(timespec="seconds"), tool_version=__version__,
                      llama_cpp=llama_cpp_label(), source=inputs.source_label, hub_commit=inputs.hub_commit,
                      offline=offline, note=inputs.note, builds=builds,
                      tags=planned_tags(models, gate), hosts=hosts, registry=registry)
    return plan, models


def make_plan(manifest: Manifest, manifest_path: Path, workspace: Workspace, progress: Progress, *,
              offline: bool = False) -> DeployPlan:
    """The plan `plan` shows and saves (see derive_plan)."""
    return derive_plan(manifest, manifest_path, workspace, progress, offline=offline)[0]
