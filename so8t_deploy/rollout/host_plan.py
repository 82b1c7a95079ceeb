"""Observe one host and decide, tag by tag, what bringing it to the desired state takes; changes nothing.

This is the one place where "is this tag unchanged?" is answered; `plan` saves the decisions and
`apply` executes them. A tag is unchanged when the host holds exactly what we would send: the
journal says we verified this spec under this manifest digest, or (with no journal, e.g. a fresh
CI clone, or a GGUF not built here yet) `/api/show` reports our template, system prompt,
parameters and the GGUF keys that identify its bytes. A tag left behind by a run that died before
its smoke tests (a `-rollback` copy on the host, or an unverified journal entry) is never
unchanged: it is verified again.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from ..external.ollama_host import OllamaHost
from ..external.ollama_show import ShownModel, same_parameters
from ..manifest.schema import Manifest
from .desired import BACKUP_SUFFIX, ROLLBACK_SUFFIX, DesiredModel
from .records import HostRecords


class ActionKind(StrEnum):
    UPLOAD = "upload"
    BACKUP = "backup"
    CREATE = "create"
    VERIFY = "verify"  # a tag a dead run changed but never smoke-tested: smoke-test it, or roll it back
    UNCHANGED = "unchanged"
    HELD = "held"  # the quality gate holds this tag back: the host keeps what it has
    DELETE = "delete"


class TagKind(StrEnum):
    CREATE = "create"
    VERIFY = "verify"
    UNCHANGED = "unchanged"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TagDecision(_Model):
    tag: str
    kind: TagKind
    observed_digest: str | None  # the tag's manifest digest when observed; None if absent
    upload: bool | None = None  # the GGUF blob is missing (None: not known until the GGUF is built)
    restore_point: bool = False  # `TAG-rollback` already holds the last verified model (a dead run's)
    existed_before: bool = False  # a live tag worth restoring (not the leftover of a dead run that created it)

    @property
    def needs_backup(self) -> bool:
        return self.kind is TagKind.CREATE and self.existed_before and not self.restore_point


class HostPlan(_Model):
    target: str
    url: str
    observed: dict[str, str] = Field(default_factory=dict)  # every tag on the host -> manifest digest
    decisions: list[TagDecision] = Field(default_factory=list)
    deletes: list[str] = Field(default_factory=list)
    error: str | None = None
    unreachable: bool = False
    warnings: list[str] = Field(default_factory=list)

    def decision(self, tag: str) -> TagDecision:
        return next(d for d in self.decisions if d.tag == tag)


def matches_shown(shown: ShownModel | None, model: DesiredModel) -> bool:
    """The host's copy is exactly `model`: same template, system, parameters and GGUF identity keys."""
    if shown is None or not model.identity or len(model.identity) != 3:
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
        spec = model.spec_digest
        fast = bool(spec) and not restore_point and not leftover and records.verified_as(model.tag, spec, digest)
        if fast or matches_shown(host.show(model.tag), model):
            kind = TagKind.VERIFY if (restore_point or leftover) else TagKind.UNCHANGED
            return TagDecision(tag=model.tag, kind=kind, observed_digest=digest, restore_point=restore_point,
                               existed_before=existed_before)
    upload = None if model.sha256 is None else not host.has_blob(model.digest)
    return TagDecision(tag=model.tag, kind=TagKind.CREATE, observed_digest=digest, upload=upload,
                       restore_point=restore_point, existed_before=existed_before)


def observe_host(host: OllamaHost, manifest: Manifest, desired: list[DesiredModel],
                 records: HostRecords) -> HostPlan:
    """The host's plan from its current state; raises HostError if it cannot be observed."""
    host.check_version()
    observed = host.tags()
    return HostPlan(target=host.name, url=host.url, observed=observed, warnings=list(host.warnings),
                    decisions=[decide_tag(host, observed, records, model) for model in desired],
                    deletes=namespace_extras(manifest, observed) if manifest.rollout.prune else [])


def relevant_names(manifest: Manifest) -> set[str]:
    """The tags whose state a plan depends on: every named tag with its backups."""
    return {tag + suffix for tag in manifest.tags() for suffix in ("", BACKUP_SUFFIX, ROLLBACK_SUFFIX)}


def changed_since(plan: HostPlan, manifest: Manifest, now: dict[str, str]) -> list[str]:
    """Tags whose state differs from what the plan observed (the plan's tags, backups and prune candidates)."""
    names = relevant_names(manifest) | set(plan.deletes)
    if manifest.rollout.prune:
        names |= set(namespace_extras(manifest, now))
    return sorted(n for n in names if plan.observed.get(n) != now.get(n))
