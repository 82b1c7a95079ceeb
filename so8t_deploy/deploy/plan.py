"""The DeployPlan: everything `apply` will do, computed without side effects, and saved as JSON.

It holds the build steps with their cache keys (and whether each is already built), each tag's
Modelfile and the quality gate's verdict where it is known, and per host what it holds now and
the decision for every tag. Computing it reads the manifest, hashes local inputs (remembered in
the workspace's digest cache), asks the hub for metadata and observes each host: it never
downloads weights, starts a container or changes a host.

`plan --out FILE` saves it and `apply --plan FILE` executes exactly it: apply refuses (exit 3) if
the manifest, an input, or a host changed in the meantime. `apply` without a saved plan makes one
and executes it, so there is one decision path.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import __version__
from ..build.inputs import resolve_inputs
from ..build.plan import BuildPlan, plan_builds
from ..build.provenance import llama_cpp_label
from ..build.workspace import Workspace
from ..errors import EXIT_DRIFT, EXIT_OK, EXIT_OPERATIONAL, UsageError
from ..fsutil import write_atomic
from ..manifest.schema import Manifest
from ..progress import Progress
from ..quality.evaluate import cached_gate
from ..rollout.desired import DesiredModel, desired_models
from ..rollout.fleet import plan_hosts
from ..rollout.host_plan import ActionKind, HostPlan, TagKind


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlannedTag(_Model):
    tag: str
    gguf_name: str
    template: str
    system: str | None
    parameters: dict[str, Any]
    identity: dict[str, str] | None
    sha256: str | None  # once built
    size: int | None
    gate: list[str] | None  # why the quality gate holds it back ([] passes), None: not evaluated yet

    @property
    def held(self) -> bool:
        return bool(self.gate)

    def desired(self) -> DesiredModel:
        return DesiredModel(tag=self.tag, gguf_name=self.gguf_name, template=self.template, system=self.system,
                            parameters=self.parameters, identity=self.identity, sha256=self.sha256, size=self.size)


class Action(_Model):
    kind: ActionKind
    tag: str
    detail: str = ""
    bytes: int | None = 0  # None: not known until built


class DeployPlan(_Model):
    format: Literal["so8t-deploy/plan-v1"] = "so8t-deploy/plan-v1"
    manifest: str  # the manifest file the plan was made from
    manifest_digest: str  # of the validated manifest (header values excluded)
    created_at: str
    tool_version: str
    llama_cpp: str
    source: str  # the model as resolved: a local path, or org/name@commit
    note: str = ""  # why some keys are unknown
    builds: BuildPlan
    tags: list[PlannedTag]
    hosts: list[HostPlan] = Field(default_factory=list)

    def planned(self, tag: str) -> PlannedTag:
        return next(t for t in self.tags if t.tag == tag)

    def actions(self, host: HostPlan) -> list[Action]:
        """The host's decisions as rows to read: upload, backup, create, verify, unchanged, held, delete."""
        rows: list[Action] = []
        for d in host.decisions:
            tag = self.planned(d.tag)
            if d.kind is TagKind.UNCHANGED:
                rows.append(Action(kind=ActionKind.UNCHANGED, tag=d.tag))
            elif d.kind is TagKind.VERIFY:
                rows.append(Action(kind=ActionKind.VERIFY, tag=d.tag, detail="left unverified by an earlier run"))
            elif tag.held:
                rows.append(Action(kind=ActionKind.HELD, tag=d.tag, detail="; ".join(tag.gate or [])))
            else:
                rows += _create_rows(d.tag, d.upload, d.needs_backup, tag)
        rows += [Action(kind=ActionKind.DELETE, tag=t, detail="pruned") for t in host.deletes]
        return rows

    def upload_bytes(self, host: HostPlan) -> int | None:
        sizes = [a.bytes for a in self.actions(host) if a.kind is ActionKind.UPLOAD]
        return None if None in sizes else sum(s or 0 for s in sizes)

    @property
    def drift(self) -> bool:
        return any(a.kind is not ActionKind.UNCHANGED for h in self.hosts for a in self.actions(h))

    @property
    def check_exit_code(self) -> int:
        """plan --check: 0 exactly when apply would change nothing and exit 0; 3 drift; 1 a host not observed."""
        if any(h.error for h in self.hosts):
            return EXIT_OPERATIONAL
        return EXIT_DRIFT if self.drift else EXIT_OK

    def save(self, path: Path) -> None:
        write_atomic(path, self.model_dump_json(indent=2) + "\n")


def _create_rows(tag: str, upload: bool | None, backup: bool, planned: PlannedTag) -> list[Action]:
    rows = []
    if upload is None:
        rows.append(Action(kind=ActionKind.UPLOAD, tag=tag, detail="if missing once built", bytes=None))
    elif upload:
        rows.append(Action(kind=ActionKind.UPLOAD, tag=tag, detail=planned.gguf_name, bytes=planned.size))
    if backup:
        rows.append(Action(kind=ActionKind.BACKUP, tag=tag, detail=f"copy to {tag}-prev once verified"))
    if planned.sha256:
        detail = f"sha256:{planned.sha256[:12]}"
    else:
        detail = "after build" if planned.identity else "after build (key known after download)"
    if planned.gate is None:
        detail += "; quality gate pending"
    rows.append(Action(kind=ActionKind.CREATE, tag=tag, detail=detail))
    return rows


def manifest_digest(manifest: Manifest) -> str:
    """What identifies a manifest's content; header values (secrets) are left out, names kept."""
    data = manifest.model_dump(mode="json", by_alias=True)
    for target in data.get("targets", []):
        target["headers"] = sorted(target.get("headers", {}))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def make_plan(manifest: Manifest, manifest_path: Path, workspace: Workspace, progress: Progress, *,
              offline: bool = False) -> DeployPlan:
    inputs = resolve_inputs(manifest, workspace, progress, download_model=False, manifest_path=manifest_path,
                            offline=offline)
    builds = plan_builds(manifest, inputs, workspace)
    gate = cached_gate(manifest, builds, workspace)
    tags = []
    for model in desired_models(manifest, builds):
        tags.append(PlannedTag(tag=model.tag, gguf_name=model.gguf_name, template=model.template,
                               system=model.system, parameters=model.parameters, identity=model.identity,
                               sha256=model.sha256, size=model.size, gate=gate[model.tag]))
    hosts = plan_hosts(manifest, [t.desired() for t in tags], workspace) if not offline else []
    return DeployPlan(manifest=str(manifest_path), manifest_digest=manifest_digest(manifest),
                      created_at=datetime.now(UTC).isoformat(timespec="seconds"), tool_version=__version__,
                      llama_cpp=llama_cpp_label(), source=inputs.source_label, note=inputs.note, builds=builds,
                      tags=tags, hosts=hosts)


def load_plan(path: Path) -> DeployPlan:
    try:
        return DeployPlan.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: cannot read the plan: {e.strerror}") from e
    except ValidationError as e:
        raise UsageError(f"{path}: not a plan written by `so8t-deploy plan --out` ({e.error_count()} errors)") from e
