"""The GitOps commands: validate, schema, plan, apply, smoke."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from ..errors import (
    EXIT_DRIFT,
    EXIT_INTERRUPTED,
    EXIT_OPERATIONAL,
    DriftError,
    HostError,
    Interrupted,
    RegistryError,
    RolloutError,
    UsageError,
)
from ..external.hub import HubUnavailableError
from .typer_app import DEFAULT_CACHE, CacheOpt, JsonOpt, ManifestArg, VerifyCacheOpt, app, load

Format = Literal["table", "json", "markdown"]


@app.command()
def validate(manifest: ManifestArg) -> None:
    """Check a manifest and its local inputs (no network); exit 2 with one line naming the field if it fails."""
    from ..deploy.check import check_local_inputs, source_family

    loaded = load(manifest)
    for note in check_local_inputs(loaded):
        typer.echo(f"{manifest}: note: {note}", err=True)
    if family := source_family(loaded):
        typer.echo(f"{manifest}: model: {family}")
    typer.echo(f"{manifest}: ok")


@app.command()
def schema() -> None:
    """Print the manifest's JSON Schema."""
    from ..manifest.schema import Manifest
    from .console import print_json

    print_json(Manifest.model_json_schema(by_alias=True))


@app.command()
def plan(
    manifest: ManifestArg,
    check: Annotated[bool, typer.Option("--check", help="Exit 3 if apply would change anything, 1 if a host or the "
                                        "hub cannot be observed.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Save the plan, for `apply --plan`.")] = None,
    allow_unknown_keys: Annotated[bool, typer.Option(
        "--allow-unknown-keys", help="Save the plan (--out) although the hub could not be asked, so some keys are "
        "unknown; apply then leaves tags whose keys turn out unchanged alone.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Only the build steps: no hub, no hosts.")] = False,
    output: Annotated[str, typer.Option("--format", help="table | json | markdown (for a pull request).")] = "table",
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = DEFAULT_CACHE,
) -> None:
    """Show what apply would do: build steps with their keys, and per host upload, create, promote, verify,
    unchanged, held, tidy, delete. Changes nothing."""
    from ..deploy.commands import plan_manifest
    from ..store.workspace import Workspace
    from .console import ConsoleProgress, print_deploy_plan

    fmt = _format(output, as_json)
    if offline and check:
        raise UsageError("--offline --check: a drift check needs the hosts, which --offline does not ask")
    if out is not None and out.is_dir():
        raise UsageError(f"--out {out}: is a directory; name the file to write the plan to")
    loaded = load(manifest)
    with ConsoleProgress() as progress:
        made = plan_manifest(loaded, manifest, Workspace(cache_dir), progress, offline=offline)
    print_deploy_plan(made, fmt)
    if out is not None:
        if made.note and not offline and not allow_unknown_keys:
            raise HubUnavailableError(f"plan: not saved to {out}: the hub could not be asked, so some keys are "
                                      "unknown; plan again once it answers, or pass --allow-unknown-keys to save it")
        try:
            made.save(out)
        except OSError as e:
            raise UsageError(f"--out {out}: cannot write the plan: {e.strerror or e}") from e
    if made.registry is not None and made.registry.blocking:
        raise RegistryError(f"plan: {made.registry.problem}")
    down = [h for h in made.hosts if h.error]
    if down:
        raise HostError(f"plan: {len(down)} of {len(made.hosts)} hosts could not be observed: "
                        + "; ".join(f"{h.target}: {h.error}" for h in down))
    if check and made.check_exit_code == EXIT_OPERATIONAL:
        raise HubUnavailableError(f"plan --check: could not observe {'; '.join(made.unobserved)}")
    if check and made.check_exit_code == EXIT_DRIFT:
        raise DriftError(f"{manifest}: drift on {', '.join(sorted(made.drifted))}")


def _format(output: str, as_json: bool) -> Format:
    if as_json:
        return "json"
    if output not in ("table", "json", "markdown"):
        raise UsageError(f"--format: expected table, json or markdown, got {output!r}")
    return output  # type: ignore[return-value]


@app.command()
def apply(
    manifest: ManifestArg,
    saved_plan: Annotated[Path | None, typer.Option("--plan", help="A plan from `plan --out`: apply does at most "
                                                    "what it shows; refused, exit 3, if anything moved since.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Roll out tags that fail the quality gate.")] = False,
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = DEFAULT_CACHE,
    verify_cache: VerifyCacheOpt = False,
) -> None:
    """Build, register, smoke-test and roll out every tag: canary first, all or nothing per host, prune."""
    from ..cancel import CancelToken
    from ..deploy.commands import apply_manifest
    from ..store.workspace import Workspace
    from .console import ConsoleProgress, print_apply_result
    from .interrupts import interrupts_ask

    loaded, cancel = load(manifest), CancelToken()
    with interrupts_ask(cancel), ConsoleProgress() as progress:
        result = apply_manifest(loaded, manifest, Workspace(cache_dir), progress, cancel=cancel, force=force,
                                plan_file=saved_plan, verify_cache=verify_cache)
    print_apply_result(result, as_json=as_json)
    states = "; ".join(f"{h.target}: {h.status}, {h.outcome}" + (f" ({h.error})" if h.error else "")
                       for h in result.hosts if h.status != "ok")
    code = result.exit_code
    if code == EXIT_INTERRUPTED:
        raise Interrupted(f"apply: interrupted; {states or 'nothing was changed'}")
    if code == EXIT_DRIFT:
        raise DriftError(f"apply: {states}")
    if result.failed:
        raise RolloutError(f"apply: {len(result.failed)} of {len(result.hosts)} hosts failed: {states}")
    if result.gated:
        raise RolloutError(f"apply: the quality gate held back {', '.join(result.gated)} "
                           "(see `so8t-deploy eval`; --force rolls them out anyway)")


@app.command()
def smoke(manifest: ManifestArg, as_json: JsonOpt = False) -> None:
    """Run the manifest's smoke tests against every tag on every host."""
    from ..deploy.commands import smoke_manifest
    from ..errors import SmokeTestError
    from .console import print_smoke_results

    results = smoke_manifest(load(manifest))
    print_smoke_results(results, as_json=as_json)
    failed = [r for r in results if not r.passed]
    if failed:
        raise SmokeTestError(f"smoke: {len(failed)} of {len(results)} checks failed "
                             f"(first: {failed[0].host} {failed[0].tag}: {failed[0].reason})")
