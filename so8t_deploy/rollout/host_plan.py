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
duplicates the live tag or the backup, a registry-mode pull `HOST/NAMESPACE/NAME:TAG` of a named
tag not yet copied to its candidate, whatever the registry settings are now) are tidied before
the first create.
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum

from pydantic import Field

from ..build.plan import IDENTITY_KEYS
from ..build.provenance import IMATRIX_KEY
from ..errors import HostError
from ..external.ollama_host import OllamaHost
from ..external.ollama_show import ShownModel, same_parameters
from ..frozen import Frozen
from ..manifest.deploy_schema import OLLAMA_DEFAULT_HOST
from ..manifest.schema import Manifest
from .desired import COMPANION_SUFFIXES, DesiredModel
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
    HELD = "held"  # a create the quality gate holds back: the host keeps what it has


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

    def gated(self, held: Collection[str]) -> HostPlan:
        """This plan with the quality gate's verdict: the creates of `held` tags held back, every other held
        tag created (the one place a verdict becomes a decision; --force passes nothing)."""
        def kind(d: TagDecision) -> TagKind:
            if d.kind not in (TagKind.CREATE, TagKind.HELD):
                return d.kind
            return TagKind.HELD if d.tag in held else TagKind.CREATE

        return self.model_copy(update={"decisions": [d.model_copy(update={"kind": kind(d)}) for d in self.decisions]})

    def tags(self, kind: TagKind) -> list[str]:
        return [d.tag for d in self.decisions if d.kind is kind]

    @property
    def idle(self) -> bool:
        """Nothing to do on this host: every tag unchanged, nothing to tidy or prune."""
        return not self.tidy and not self.deletes and all(d.kind is TagKind.UNCHANGED for d in self.decisions)


def matches_shown(shown: ShownModel | None, model: DesiredModel) -> bool:
    """The host's copy is exactly `model`: same template, system, parameters and GGUF identity keys."""
    if shown is None or not model.identity or not set(IDENTITY_KEYS) <= model.identity.keys():
        return False
    # Every identity key the desired model has, and the importance matrix's even when it has none: a copy
    # quantized with one is not the copy a manifest without one builds.
    keys = {*model.identity, IMATRIX_KEY}
    return (shown.sent_template == model.template and shown.system == (model.system or None)
            and same_parameters(model.parameters, shown.parameters)
            and all(shown.model_info.get(k) == model.identity.get(k) for k in keys))


def in_namespace(manifest: Manifest, tag: str) -> bool:
    """Whether `tag` is a model of the manifest's own name (Ollama matches names case-insensitively)."""
    return tag.lower().startswith(manifest.name.lower() + ":")


OLLAMA_DEFAULT_NAMESPACE = "library"  # of a model name that has none


def name_parts(name: str) -> tuple[str, str, str, str]:
    """(host, namespace, model, tag) of a model name as /api/tags lists it (Ollama's DisplayShortest leaves the
    default host and namespace out)."""
    rest, tag = (name.rsplit(":", 1) if name.rfind(":") > name.rfind("/") else (name, "latest"))
    parts = rest.split("/")
    host, namespace = OLLAMA_DEFAULT_HOST, OLLAMA_DEFAULT_NAMESPACE
    if len(parts) >= 3:
        host, namespace = "/".join(parts[:-2]), parts[-2]
    elif len(parts) == 2:
        namespace = parts[0]
    return host, namespace, parts[-1], tag


def pulled_copy_of(manifest: Manifest, name: str) -> str | None:
    """The manifest's tag that `name` is a registry-mode pull of (HOST/NAMESPACE/NAME:TAG from any registry and
    namespace, as a run stopped between the pull and the copy to the candidate leaves it), or None."""
    host, _, model, tag = name_parts(name)
    if host.lower() == OLLAMA_DEFAULT_HOST or model.lower() != manifest.name:
        return None
    return next((t for t in manifest.tags() if t.split(":", 1)[1].lower() == tag.lower()), None)


def companions(manifest: Manifest) -> set[str]:
    """Every named tag with its candidate, rollback and backup tags."""
    return {tag + suffix for tag in manifest.tags() for suffix in ("", *COMPANION_SUFFIXES)}


def as_named(manifest: Manifest, listed: dict[str, str]) -> dict[str, str]:
    """A host's models, with every name that matches one of the manifest's tags or their companions ignoring case
    keyed by the manifest's spelling: Ollama matches names ignoring case, and writes a new name in the spelling
    of any part it already holds (a host holding `x:Q8_0` stores a copy to `name:q8_0` as `name:Q8_0`)."""
    ours = {name.lower(): name for name in companions(manifest)}
    return {ours.get(name.lower(), name): digest for name, digest in listed.items()}


def spelling_problem(manifest: Manifest, observed: dict[str, str]) -> str | None:
    """Registry mode: why this host would pull from another repository than the one published, or None.

    Ollama's pull first gives each part of the name the spelling of any model it holds whose part matches
    ignoring case (routes.go getExistingName); a repository path is lowercase, so a held `Fleet/...` or
    `.../So8t-Demo` would send the pull to a repository that does not exist. (A tag part is handled by
    publishing every spelling a host would ask for: see tag_spellings.)"""
    registry = manifest.distribution.registry
    if registry is None:
        return None
    for name in observed:
        _, namespace, model, _ = name_parts(name)
        for held, ours in ((namespace, registry.namespace), (model, manifest.name)):
            if held.lower() == ours and held != ours:
                return (f"it holds {name!r}, so Ollama would pull {ours!r} as {held!r} (it reuses the spelling of a "
                        "model it holds, ignoring case), which the registry cannot serve; rename or delete that model")
    return None


def tag_spellings(manifest: Manifest, hosts: list[HostPlan]) -> dict[str, set[str]]:
    """Registry mode: per tag, the spellings of its tag part that some host holds (ignoring case), which that
    host's pull would ask the registry for (see spelling_problem)."""
    found: dict[str, set[str]] = {}
    for tag in manifest.tags():
        part = tag.split(":", 1)[1]
        found[tag] = {held for h in hosts for name in h.observed
                      if (held := name_parts(name)[3]).lower() == part.lower() and held != part}
    return {tag: spellings for tag, spellings in found.items() if spellings}


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


def new_models(hosts: list[HostPlan]) -> set[str]:
    """The tags some host gets a new model for (created or pulled; a candidate an interrupted run left is reused
    instead)."""
    return {d.tag for h in hosts for d in h.decisions if d.kind is TagKind.CREATE and not d.reuse_candidate}


def leftovers(decision: TagDecision, model: DesiredModel, observed: dict[str, str]) -> list[str]:
    """The companions of one tag that an interrupted run left and that apply tidies before any create."""
    found = []
    if model.candidate_tag in observed and not decision.reuse_candidate:
        found.append(model.candidate_tag)
    if model.rollback_tag in observed and decision.kind is not TagKind.VERIFY:
        found.append(model.rollback_tag)
    return found


def observe_host(host: OllamaHost, manifest: Manifest, desired: list[DesiredModel],
                 records: HostRecords) -> HostPlan:
    """The host's plan from its current state; raises HostError if it cannot be observed."""
    host.check_version()
    observed = as_named(manifest, host.tags())
    pulls = manifest.distribution.registry is not None
    if pulls and (problem := spelling_problem(manifest, observed)) is not None:
        raise HostError(f"{host.name}: {problem}")
    decisions = [decide_tag(host, observed, records, model, pulls=pulls) for model in desired]
    tidy = [name for d, m in zip(decisions, desired, strict=True) for name in leftovers(d, m, observed)]
    tidy += sorted(name for name in observed if pulled_copy_of(manifest, name) is not None)
    return HostPlan(target=host.name, url=host.url, observed=observed, warnings=list(host.warnings),
                    decisions=decisions, tidy=tidy,
                    deletes=namespace_extras(manifest, observed) if manifest.rollout.prune else [])


def relevant_names(manifest: Manifest, plan: HostPlan) -> set[str]:
    """The tags whose state a host's plan depends on: every named tag with its companions, and what it prunes."""
    names = companions(manifest) | set(plan.deletes) | {t for t in plan.observed if pulled_copy_of(manifest, t)}
    if manifest.rollout.prune:
        names |= {t for t in plan.observed if in_namespace(manifest, t)}
    return names


def changed_since(plan: HostPlan, manifest: Manifest, now: dict[str, str]) -> list[str]:
    """Tags whose state differs from what the plan observed (its tags, their companions, prune candidates)."""
    names = relevant_names(manifest, plan) | {t for t in now if pulled_copy_of(manifest, t)}
    if manifest.rollout.prune:
        names |= set(namespace_extras(manifest, now))
    return sorted(n for n in names if plan.observed.get(n) != now.get(n))

