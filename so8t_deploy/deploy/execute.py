"""Execute a deployment: derive the plan now, hold it against a saved one, build, gate, publish (registry mode),
roll out.

Builds are planned once: without a saved plan by this run's own derivation, with one (`apply --plan`) by
the plan, whose steps are run as saved once each has been checked against the manifest and the inputs
now (saved_plan.check_steps). What apply does to hosts comes from the manifest and what it observes now
(one decision path): every host is observed before the first change. A saved plan only pins and
narrows that (see saved_plan): anything it recorded that moved is refused with exit 3 before a
single change, so a plan reviewed on a pull request is never exceeded by merging it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..build.calibration import check_held_out, eval_text
from ..build.inputs import resolve_inputs
from ..build.pipeline import BuildReport, Pipeline
from ..build.plan import plan_builds
from ..build.runner import Runner, runner_for
from ..chat.setup import resolve_chat
from ..errors import EXIT_DRIFT, EXIT_INTERRUPTED, EXIT_OK, EXIT_OPERATIONAL, RegistryError
from ..quality.evaluate import evaluate, gate_failures
from ..rollout.desired import DesiredModel, desired_models, write_release
from ..rollout.fleet import apply_rollout, plan_hosts
from ..rollout.host_apply import HostReport, HostStatus
from ..rollout.host_plan import TagKind, new_models, tag_spellings
from ..rollout.publish import PublishReport, publish
from ..rollout.run_context import RunContext
from .plan import DeployPlan, derive_plan
from .saved_plan import check_fits, check_steps, check_unchanged


@dataclass(frozen=True)
class ApplyOptions:
    """How apply runs, beyond the manifest: `apply [--plan FILE] [--force] [--verify-cache]`."""

    saved: DeployPlan | None = None  # a plan from `plan --out`: checked input that pins and narrows the run
    saved_path: Path = Path("plan")  # what errors about the saved plan name
    force: bool = False  # roll out tags that fail the quality gate
    verify_cache: bool = False  # hash cached artifacts and downloads again before trusting them


@dataclass
class ApplyResult:
    plan: DeployPlan
    hosts: list[HostReport]
    build: BuildReport = field(default_factory=BuildReport)
    gated: dict[str, list[str]] = field(default_factory=dict)  # tag -> why the quality gate held it back
    forced: dict[str, list[str]] = field(default_factory=dict)  # failing tags rolled out anyway (force)
    published: PublishReport | None = None  # registry mode: what was pushed to the registry
    interrupted: bool = False

    @property
    def failed(self) -> list[HostReport]:
        return [h for h in self.hosts if h.status in (HostStatus.FAILED, HostStatus.UNREACHABLE)]

    @property
    def changed(self) -> list[HostReport]:
        return [h for h in self.hosts if h.status is HostStatus.CHANGED]

    @property
    def exit_code(self) -> int:
        """130 interrupted; 1 a host failed or was down, or the gate held a tag; 3 someone else changed a host
        during the run (the hosts it stopped are skipped, not failed); 0 converged."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.failed or self.gated:
            return EXIT_OPERATIONAL
        return EXIT_DRIFT if self.changed else EXIT_OK


def _build(run: RunContext, plan: DeployPlan, models: dict[str, DesiredModel], tags: list[str],
           verify_cache: bool) -> tuple[BuildReport, Runner]:
    """Run the plan's build steps that the creates need and fill the built GGUFs into `models`; where the plan
    could not know the keys (the hub was out of reach), the steps and every model are derived from the inputs
    now downloaded."""
    manifest, workspace, progress = run.manifest, run.workspace, run.progress
    inputs = resolve_inputs(manifest, workspace, progress, download_model=True, hub_commit=plan.hub_commit,
                            manifest_path=Path(plan.manifest), verify_cache=verify_cache)
    if manifest.quality.gated:  # the gate measures on the eval text: it must not be the calibration data
        check_held_out(eval_text(manifest), inputs.calibration)
    runner = runner_for(manifest, workspace, progress)
    chat = resolve_chat(manifest.modelfile, inputs.chat_dir)  # before the build: a template refused costs nothing
    builds = plan_builds(manifest, inputs, workspace) if plan.unknown_keys else plan.builds
    report = Pipeline(manifest, inputs, workspace, runner, progress, verify_cache=verify_cache).build(builds, tags)
    if plan.unknown_keys:
        models.update((m.tag, m) for m in desired_models(manifest, builds, chat))
    for artifact in report.artifacts:
        models[artifact.tag] = models[artifact.tag].built(artifact)
        write_release(workspace.releases, manifest, artifact, chat)
    return report, runner


def apply_plan(run: RunContext, manifest_path: Path, options: ApplyOptions = ApplyOptions()) -> ApplyResult:
    """Derive the plan now (pinned to a saved plan's hub commit, running its build steps), check it against the
    saved plan, and execute it."""
    manifest, workspace, progress, cancel = run.manifest, run.workspace, run.progress, run.cancel
    saved, force, verify_cache = options.saved, options.force, options.verify_cache
    if saved is not None:
        check_fits(saved, manifest, options.saved_path)
    inputs = resolve_inputs(manifest, workspace, progress, download_model=False, manifest_path=manifest_path,
                            hub_commit=saved.hub_commit if saved else None)
    if saved is not None:
        check_steps(saved, manifest, inputs, options.saved_path)
    steps = saved.builds if saved is not None and not saved.unknown_keys else None  # see check_steps
    plan, desired = derive_plan(manifest, manifest_path, workspace, progress, inputs=inputs, builds=steps)
    if saved is not None:
        check_unchanged(saved, plan, manifest)
    if plan.registry is not None and plan.registry.blocking:
        raise RegistryError(f"apply: {plan.registry.problem}; nothing was changed")
    result = ApplyResult(plan=plan, hosts=[])
    models = {m.tag: m for m in desired}
    creating = {t for h in plan.hosts for t in h.tags(TagKind.CREATE)}
    failing = {t: list(plan.planned(t).gate or []) for h in plan.hosts for t in h.tags(TagKind.HELD)}  # the plan's
    to_build = sorted(creating | set(failing) if force else creating)
    hosts = plan.hosts
    if to_build:
        result.build, runner = _build(run, plan, models, to_build, verify_cache)
        if plan.unknown_keys:  # known only now: a tag that turns out unchanged is left alone, never re-created
            hosts = plan_hosts(manifest, list(models.values()), workspace)
        unknown = [a for a in result.build.artifacts if plan.planned(a.tag).gate is None]
        if manifest.quality.gated and unknown:
            report = BuildReport(artifacts=unknown, references=result.build.references)
            for quality in evaluate(manifest, report, workspace, runner):
                if reasons := gate_failures(manifest, quality):
                    failing[quality.tag] = reasons
    if force:
        result.forced = failing
    else:
        result.gated = failing
    hosts = [h.gated(result.gated) for h in hosts]
    for tag, reasons in result.gated.items():
        progress.warning(f"quality gate: {tag} is not rolled out: {'; '.join(reasons)}")
    for tag, reasons in result.forced.items():
        progress.warning(f"forced: rolling out {tag} although it fails the quality gate: {'; '.join(reasons)}")
    registry = manifest.distribution.registry
    if registry is not None and (pulled := sorted(new_models(hosts))):
        result.published, published = publish(registry, [models[t] for t in pulled], progress, cancel,
                                              tag_spellings(manifest, hosts))
        models.update(published)
    result.hosts = apply_rollout(run, hosts, models)
    result.interrupted = cancel.cancelled
    return result

