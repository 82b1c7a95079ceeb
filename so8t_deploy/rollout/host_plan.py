"""Observe one host and decide, tag by tag, what bringing it to the desired state takes; changes nothing.

`plan` shows these decisions and `apply` executes them, so there is one place where "is this tag
unchanged?" is answered. A tag is unchanged when the host holds exactly what we would send: the
journal says we verified this spec under this manifest digest, or (with no journal, e.g. a fresh
CI clone) `/api/show` reports our template, system prompt, parameters and the GGUF keys that
identify its bytes. A tag left behind by a run that died before its smoke tests (a `-rollback`
copy on the host, or an unverified journal entry) is never unchanged: it is verified again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from ..desired import BACKUP_SUFFIX, ROLLBACK_SUFFIX, DesiredModel
from ..external.ollama_host import OllamaHost
from ..external.ollama_show import ShownModel, same_parameters
from ..manifest import Manifest
from .records import HostRecords


class ActionKind(StrEnum):
    UPLOAD = "upload"
    BACKUP = "backup"
    CREATE = "create"
    VERIFY = "verify"  # a tag a dead run changed but never smoke-tested: smoke-test it, or roll it back
    UNCHANGED = "unchanged"
    DELETE = "delete"


class TagKind(StrEnum):
    CREATE = "create"
    VERIFY = "verify"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class TagDecision:
    model: DesiredModel
    kind: TagKind
    observed_digest: str | None  # the tag's manifest digest when observed; None if absent
    upload: bool = False  # the GGUF blob was missing when observed
    restore_point: bool = False  # `TAG-rollback` already holds the last verified model (a dead run's)
    existed_before: bool = False  # a live tag worth restoring (not the leftover of a dead run that created it)

    @property
    def tag(self) -> str:
        return self.model.tag

    @property
    def needs_backup(self) -> bool:
        return self.kind is TagKind.CREATE and self.existed_before and not self.restore_point


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    tag: str
    detail: str = ""
    bytes: int = 0


@dataclass
class HostPlan:
    target: str
    url: str
    observed: dict[str, str] = field(default_factory=dict)  # every tag on the host -> manifest digest
    decisions: list[TagDecision] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    unbuilt: list[str] = field(default_factory=list)  # tags whose GGUF is not built yet
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def actions(self) -> list[Action]:
        rows: list[Action] = []
        for tag in self.unbuilt:
            rows += [Action(ActionKind.UPLOAD, tag, "after build"), Action(ActionKind.CREATE, tag, "after build")]
        for d in self.decisions:
            if d.kind is TagKind.UNCHANGED:
                rows.append(Action(ActionKind.UNCHANGED, d.tag))
                continue
            if d.upload:
                rows.append(Action(ActionKind.UPLOAD, d.tag, d.model.gguf.name, d.model.size))
            if d.needs_backup:
                rows.append(Action(ActionKind.BACKUP, d.tag, f"copy to {d.model.backup_tag} once verified"))
            if d.kind is TagKind.CREATE:
                rows.append(Action(ActionKind.CREATE, d.tag, d.model.digest[:19]))
            else:
                rows.append(Action(ActionKind.VERIFY, d.tag, "left unverified by an earlier run"))
        rows += [Action(ActionKind.DELETE, tag, "pruned") for tag in self.deletes]
        return rows

    @property
    def drift(self) -> bool:
        return self.error is not None or any(a.kind is not ActionKind.UNCHANGED for a in self.actions)

    @property
    def upload_bytes(self) -> int:
        return sum(a.bytes for a in self.actions)


def matches_shown(shown: ShownModel | None, model: DesiredModel) -> bool:
    """The host's copy is exactly `model`: same template, system, parameters and GGUF identity keys."""
    if shown is None or len(model.identity) != 3:
        return False
    return (shown.template == model.template and shown.system == (model.system or None)
            and same_parameters(model.parameters, shown.parameters)
            and all(shown.model_info.get(k) == v for k, v in model.identity.items()))


def namespace_extras(manifest: Manifest, tags: dict[str, str]) -> list[str]:
    """Models in this manifest's name that it no longer names (the backups of named tags are kept)."""
    named = manifest.tags()
    kept = set(named) | {tag + suffix for tag in named for suffix in (BACKUP_SUFFIX, ROLLBACK_SUFFIX)}
    prefix = re.escape(manifest.name) + ":"
    return sorted(t for t in tags if re.match(prefix, t) and t not in kept)


def decide_tag(host: OllamaHost, observed: dict[str, str], records: HostRecords, model: DesiredModel) -> TagDecision:
    digest = observed.get(model.tag)
    restore_point = model.rollback_tag in observed
    leftover = records.unverified(model.tag)
    existed_before = digest is not None and (restore_point or leftover is None or leftover.existed_before)
    if digest is not None:
        fast = not restore_point and not leftover and records.verified_as(model.tag, model.spec_digest, digest)
        if fast or matches_shown(host.show(model.tag), model):
            kind = TagKind.VERIFY if (restore_point or leftover) else TagKind.UNCHANGED
            return TagDecision(model, kind, digest, restore_point=restore_point, existed_before=existed_before)
    return TagDecision(model, TagKind.CREATE, digest, upload=not host.has_blob(model.digest),
                       restore_point=restore_point, existed_before=existed_before)


def observe_host(host: OllamaHost, manifest: Manifest, desired: list[DesiredModel],
                 records: HostRecords) -> HostPlan:
    """The host's plan from its current state; raises HostError if it cannot be observed."""
    plan = HostPlan(host.name, host.url)
    host.check_version()
    plan.warnings += host.warnings
    plan.observed = host.tags()
    plan.decisions = [decide_tag(host, plan.observed, records, model) for model in desired]
    if manifest.rollout.prune:
        plan.deletes = namespace_extras(manifest, plan.observed)
    return plan
