"""A saved plan is input to check, like a manifest: it may pin and narrow what apply does, never widen it.

`apply --plan FILE` derives everything it will do from the manifest and what it observes now, then
holds that against the saved plan, before touching any host:

- the file must be a plan of this version, unedited: every build step's key hashes its content,
  and every tag's identity is its step's (`load_plan`, exit 2);
- it must fit the manifest (`check_fits`, exit 2): the same name, tags and targets, made with the
  hosts observed, and nothing in it outside the manifest's own name (a plan may not delete
  `victim:latest`, nor prune when the manifest does not);
- its build steps must be the manifest's, on the inputs as they are now (`check_steps`): a step
  whose settings are not the manifest's is refused (exit 2), one whose inputs moved (the model, an
  adapter, the calibration text, the tool or llama.cpp version) is drift (exit 3). Apply then runs
  these steps as saved: it does not plan builds again;
- nothing it recorded may have moved (`check_unchanged`, exit 3): the manifest, every rendered
  Modelfile, every build key and GGUF digest it knew, and every host's models. A host the plan
  could not observe is refused too: nobody reviewed what apply would do there.
- apply's own decisions must be ones the plan allowed. The one difference allowed is narrower:
  a tag the plan would create because its keys were unknown (the hub was out of reach, see `plan
  --allow-unknown-keys`) and that turns out unchanged is left alone.

Everything else apply executes comes from its own derivation: the Modelfile content from the
manifest, deletions from `rollout.prune` over the manifest's own name.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from ..build.plan import BuildInputs
from ..errors import DriftError, UsageError
from ..external.hub import HubUnavailableError
from ..jsonfile import read_bounded_text
from ..manifest.schema import Manifest
from ..rollout.desired import CANDIDATE_SUFFIX, ROLLBACK_SUFFIX
from ..rollout.host_plan import (
    HostPlan,
    TagKind,
    changed_since,
    companions,
    in_namespace,
    namespace_extras,
    pulled_copy_of,
)
from ..validation import first_error
from .plan import PLAN_FORMAT, DeployPlan

MAX_PLAN_BYTES = 16 << 20  # 16 MiB: a plan of 50 hosts and 30 tags is well under 1 MiB


def load_plan(path: Path) -> DeployPlan:
    """A saved plan, bounded like a manifest: a regular file of UTF-8 JSON of this version's schema."""
    text = read_bounded_text(path, MAX_PLAN_BYTES, "plan", UsageError)
    try:
        return DeployPlan.model_validate_json(text)
    except ValidationError as e:
        errors = e.errors()
        if edited := [err for err in errors if err["type"] in ("edited_step", "edited_plan")]:
            raise UsageError(f"{path}: {edited[0]['msg']}: the plan was edited after `plan --out` wrote it; run "
                             "plan again") from None
        if any(err["loc"] == ("format",) for err in errors):
            raise UsageError(f"{path}: not a plan of this version ({PLAN_FORMAT}); run plan again") from None
        raise UsageError(f"{path}: not a plan written by `so8t-deploy plan --out`: {first_error(e)}") from None


def _listed(names: set[str] | list[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def check_fits(plan: DeployPlan, manifest: Manifest, path: Path) -> None:
    """The plan is one for this manifest and stays inside its name; UsageError (exit 2) naming what does not."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"{path}: {why}")

    if plan.name != manifest.name:
        raise refuse(f"a plan for {plan.name!r}, not for the manifest's {manifest.name!r}")
    if plan.offline:
        raise refuse("made with --offline, so it observed no host: run plan without --offline to apply it")
    named, planned = set(manifest.tags()), {t.tag for t in plan.tags}
    if planned != named:
        raise refuse(f"its tags differ from the manifest's (not in the manifest: {_listed(planned - named) or '-'}; "
                     f"missing: {_listed(named - planned) or '-'}); run plan again")
    targets, hosts = [t.name for t in manifest.targets], [h.target for h in plan.hosts]
    if sorted(hosts) != sorted(targets):
        extra, missing = _listed(set(hosts) - set(targets)) or "-", _listed(set(targets) - set(hosts)) or "-"
        raise refuse(f"its hosts differ from the manifest's targets (not in the manifest: {extra}; missing: "
                     f"{missing}); run plan again")
    allowed_tidy = companions(manifest)
    for host in plan.hosts:
        decided = [d.tag for d in host.decisions]
        if host.error is None and sorted(decided) != sorted(named):
            raise refuse(f"{host.target}: its decisions are not one per tag of the manifest")
        if stray := sorted(t for t in set(host.tidy) - allowed_tidy if pulled_copy_of(manifest, t) is None):
            raise refuse(f"{host.target}: it would remove {stray[0]!r}, which is no leftover of a tag the manifest "
                         "names")
        for tag in host.deletes:
            if not in_namespace(manifest, tag) or tag.lower() in {c.lower() for c in allowed_tidy}:
                raise refuse(f"{host.target}: it would delete {tag!r}, which is not a model of {manifest.name!r} "
                             "that the manifest no longer names; a plan may not delete it")
            if not manifest.rollout.prune:
                raise refuse(f"{host.target}: it would delete {tag!r}, but the manifest does not prune "
                             "(rollout.prune: false)")


def check_steps(saved: DeployPlan, manifest: Manifest, inputs: BuildInputs, path: Path) -> None:
    """The saved build steps are the manifest's (else UsageError, exit 2) on the inputs as they are now (else
    DriftError, exit 3), step by step, so that apply can run them as saved. A plan made while the hub was out of
    reach has no keys to check: its steps are made after download, as `plan --allow-unknown-keys` allowed."""
    if inputs.model_digest is None and not saved.unknown_keys:
        raise HubUnavailableError(f"apply: cannot check the plan's keys now: {inputs.note}; the hub could not be "
                                  "asked (see the warning above); nothing was changed")
    misfits, moved = saved.builds.check(manifest, inputs)
    if misfits:
        raise UsageError(f"{path}: {misfits[0]}; run plan again")
    if moved:
        raise DriftError(f"apply: {'; '.join(moved[:3])}{' ...' if len(moved) > 3 else ''} changed since the plan "
                         "was made; nothing was changed; run plan again")


def check_unchanged(saved: DeployPlan, now: DeployPlan, manifest: Manifest) -> None:
    """DriftError (exit 3) unless everything the saved plan recorded still holds and `now` does no more than it
    allowed; raised before any host is changed, so a stale plan is refused on every host or none."""
    moved: list[str] = []
    if saved.manifest_digest != now.manifest_digest:
        moved.append(f"the manifest {saved.manifest}")
    if saved.hub_commit is not None and now.hub_commit != saved.hub_commit:
        moved.append(f"the hub commit ({saved.hub_commit[:12]})")
    current = {t.tag: t for t in now.tags}
    unknown = set()
    for tag in saved.tags:
        fresh = current[tag.tag]
        if tag.modelfile_digest and tag.modelfile_digest != fresh.modelfile_digest:
            moved.append(f"the Modelfile of {tag.tag}")
        if tag.identity is None or not tag.modelfile_digest:  # known after download (the plan allowed it)
            unknown.add(tag.tag)
        elif tag.identity != fresh.identity or (None not in (tag.sha256, fresh.sha256) and tag.sha256 != fresh.sha256):
            moved.append(f"the build inputs of {tag.tag}")
    observed = {h.target: h for h in now.hosts}
    for host in saved.hosts:
        moved += _host_moved(host, observed[host.target], manifest, unknown)
    if moved:
        raise DriftError(f"apply: {'; '.join(moved[:4])}{' ...' if len(moved) > 4 else ''} changed since the plan "
                         "was made; nothing was changed; run plan again")


def _host_moved(saved: HostPlan, now: HostPlan, manifest: Manifest, unknown: set[str]) -> list[str]:
    if saved.error is not None:
        return [f"{saved.target} (not observed when the plan was made)"] if now.error is None else []
    if now.error is not None:  # down now: apply reports it unreachable, like any host that is down
        return []
    if changed := changed_since(saved, manifest, now.observed):
        return [f"{saved.target} ({_listed(changed)})"]
    moved = []
    for before, after in zip(saved.decisions, (now.decision(d.tag) for d in saved.decisions), strict=True):
        narrower = before.tag in unknown and before.kind is TagKind.CREATE
        if before.kind is not after.kind and not narrower:
            moved.append(f"{saved.target}: {before.tag} (the plan says {before.kind}, apply derives {after.kind})")
    if not set(now.tidy) <= set(saved.tidy) | {t + s for t in unknown for s in (CANDIDATE_SUFFIX, ROLLBACK_SUFFIX)}:
        moved.append(f"{saved.target} (leftovers to tidy)")
    if sorted(now.deletes) != sorted(saved.deletes) or sorted(namespace_extras(manifest, now.observed)) != sorted(
            namespace_extras(manifest, saved.observed)):
        moved.append(f"{saved.target} (tags to prune)")
    return moved
