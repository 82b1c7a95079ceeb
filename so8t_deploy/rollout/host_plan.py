"""Observe one host and decide, for every desired tag, what apply will do there (pure: plan saves it).

What a host reports is the only truth about it: every decision comes from its /api/tags and
/api/show, so a fresh CI runner decides exactly what the machine that deployed would. The local
journal only saves /api/show calls for tags this workspace verified, and only while the host
still reports the same manifest digest.

Per tag (see host_apply for how each is carried out):
- UNCHANGED: the live tag is exactly the desired model;
- CREATE: create `TAG-candidate`, smoke-test it, then promote it to the live tag. A candidate
  that an interrupted run left and that is exactly the desired model is reused (not created
  again), but always smoke-tested first;
- VERIFY: the live tag is the desired model, but an interrupted run left its promotion
  unfinished (`TAG-rollback` holds an older model): smoke-test the live tag, then finish the
  promotion, or restore the older model.

Other leftovers of interrupted runs (a candidate that is not wanted, a `TAG-rollback` that
duplicates the live tag or the backup, in registry mode a pulled `HOST/NAMESPACE/NAME:TAG` not yet
copied to its candidate) are tidied before the first create.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from ..external.ollama_host import OllamaHost
from ..external.ollama_show import ShownModel, same_parameters
from ..frozen import Frozen
from ..manifest.schema import Manifest
from .desired import COMPANION_SUFFIXES, DesiredModel
from .image import registry_reference
from .records import HostRecords


class ActionKind(StrEnum):
    PUBLISH = "publish"  # registry mode: the tag's image, pushed once to the registry
    UPLOAD = "upload"
    PULL = "pull"  # registry mode: the host pulls the tag's image, then it is created as the candidate
    CREATE = "create"  # a candidate tag, smoke-tested before it is promoted
    VERIFY = "verify"  # a live tag an interrupted promotion left: smoke-test it, then finish or restore
    PROMOTE = "promote"  # the tested candidate becomes the live tag; the live model becomes TAG-prev
    UNCHANGED = "unchanged"
    HELD = "held"  # the quality gate holds this tag back: the host keeps what it has
    TIDY = "tidy"  # a leftover of an interrupted run: removed, or (a -rollback) kept as TAG-prev
    DELETE = "delete"  # pruned: in the manifest's name, no longer named by it


class TagKind(StrEnum):
    CREATE = "create"
    VERIFY = "verify"
    UNCHANGED = "unchanged"


class TagDecision(Frozen):
    tag: str
    kind: TagKind
    observed_digest: str | None  # the live tag's manifest digest when observed; None if absent
    upload: bool | None = None  # the GGUF blob is missing (None: not known until the GGUF is built)
    reuse_candidate: bool = False  # TAG-candidate, left by an interrupted run, is exactly the desired model


class HostPlan(Frozen):
    target: str
    url: str
    observed: dict[str, str] = Field(default_factory=dict)  # every tag on the host -> manifest digest
    decisions: list[TagDecision] = Field(default_factory=list)
    tidy: list[str] = Field(default_factory=list)  # leftovers of interrupted runs, handled before any create
    deletes: list[str] = Field(default_factory=list)  # pruned tags (rollout.prune)
    error: str | None = None
    unreachable: bool = False
    warnings: list[str] = Field(default_factory=list)

    def decision(self, tag: str) -> TagDecision:
        return next(d for d in self.decisions if d.tag == tag)

    @property
    def idle(self) -> bool:
        """Nothing to do on this host: every tag unchanged, nothing to tidy or prune."""
        return not self.tidy and not self.deletes and all(d.kind is TagKind.UNCHANGED for d in self.decisions)


def matches_shown(shown: ShownModel | None, model: DesiredModel) -> bool:
    """The host's copy is exactly `model`: same template, system, parameters and GGUF identity keys."""
    if shown is None or not model.identity or len(model.identity) != 3:
        return False
    return (shown.sent_template == model.template and shown.system == (model.system or None)
            and same_parameters(model.parameters, shown.parameters)
            and all(shown.model_info.get(k) == v for k, v in model.identity.items()))


def in_namespace(manifest: Manifest, tag: str) -> bool:
    """Whether `tag` is a model of the manifest's own name (Ollama matches names case-insensitively)."""
    return tag.lower().startswith(manifest.name.lower() + ":")


def pulled_name(manifest: Manifest, tag: str) -> str | None:
    """In registry mode, the name a host lists `tag`'s pulled image under until it is copied to the candidate."""
    registry = manifest.distribution.registry
    return registry_reference(registry, tag) if registry is not None else None


def companions(manifest: Manifest) -> set[str]:
    """Every named tag with its candidate, rollback and backup tags (and, in registry mode, its pulled name)."""
    names = {tag + suffix for tag in manifest.tags() for suffix in ("", *COMPANION_SUFFIXES)}
    return names | {name for tag in manifest.tags() if (name := pulled_name(manifest, tag)) is not None}


def namespace_extras(manifest: Manifest, tags: dict[str, str]) -> list[str]:
    """Models in this manifest's name that it no longer names (the companions of named tags are kept)."""
    kept = {t.lower() for t in companions(manifest)}
    return sorted(t for t in tags if in_namespace(manifest, t) and t.lower() not in kept)


def _live_matches(host: OllamaHost, records: HostRecords, model: DesiredModel, digest: str | None) -> bool:
    if digest is None:
        return False
    return records.verified_as(model.tag, model.spec_digest, digest) or matches_shown(host.show(model.tag), model)


def decide_tag(host: OllamaHost, observed: dict[str, str], records: HostRecords, model: DesiredModel, *,
               pulls: bool = False) -> TagDecision:
    """The decision for one tag; `pulls`: the host pulls from the registry, so no blob is uploaded to it."""
    live, backup = observed.get(model.tag), observed.get(model.backup_tag)
    rollback = observed.get(model.rollback_tag)
    if _live_matches(host, records, model, live):
        unfinished = rollback is not None and rollback not in (live, backup)
        kind = TagKind.VERIFY if unfinished else TagKind.UNCHANGED
        return TagDecision(tag=model.tag, kind=kind, observed_digest=live)
    reuse = model.candidate_tag in observed and matches_shown(host.show(model.candidate_tag), model)
    upload = False if pulls or reuse else None if model.sha256 is None else not host.has_blob(model.digest)
    return TagDecision(tag=model.tag, kind=TagKind.CREATE, observed_digest=live, upload=upload,
                       reuse_candidate=reuse)


def leftovers(decision: TagDecision, model: DesiredModel, observed: dict[str, str],
              pulled: str | None = None) -> list[str]:
    """The companions of one tag that an interrupted run left and that apply tidies before any create (`pulled`:
    the tag's pulled name in registry mode)."""
    found = [name for name in observed if pulled is not None and name.lower() == pulled.lower()]
    if model.candidate_tag in observed and not decision.reuse_candidate:
        found.append(model.candidate_tag)
    if model.rollback_tag in observed and decision.kind is not TagKind.VERIFY:
        found.append(model.rollback_tag)
    return found


def observe_host(host: OllamaHost, manifest: Manifest, desired: list[DesiredModel],
                 records: HostRecords) -> HostPlan:
    """The host's plan from its current state; raises HostError if it cannot be observed."""
    host.check_version()
    observed = host.tags()
    pulls = manifest.distribution.registry is not None
    decisions = [decide_tag(host, observed, records, model, pulls=pulls) for model in desired]
    tidy = [name for d, m in zip(decisions, desired, strict=True)
            for name in leftovers(d, m, observed, pulled_name(manifest, m.tag))]
    return HostPlan(target=host.name, url=host.url, observed=observed, warnings=list(host.warnings),
                    decisions=decisions, tidy=tidy,
                    deletes=namespace_extras(manifest, observed) if manifest.rollout.prune else [])


def relevant_names(manifest: Manifest, plan: HostPlan) -> set[str]:
    """The tags whose state a host's plan depends on: every named tag with its companions, and what it prunes."""
    names = companions(manifest) | set(plan.deletes)
    if manifest.rollout.prune:
        names |= {t for t in plan.observed if in_namespace(manifest, t)}
    return names


def changed_since(plan: HostPlan, manifest: Manifest, now: dict[str, str]) -> list[str]:
    """Tags whose state differs from what the plan observed (its tags, their companions, prune candidates)."""
    names = relevant_names(manifest, plan)
    if manifest.rollout.prune:
        names |= set(namespace_extras(manifest, now))
    return sorted(n for n in names if plan.observed.get(n) != now.get(n))

