"""Execute a DeployPlan: build what the creates need, hold back what fails the quality gate, roll out.

A saved plan is executed only if nothing it depends on moved: the manifest (its digest), the
inputs (the build keys the plan showed) and every host (what it observed). Anything else is
refused with exit 3 before a single change, so a plan reviewed on a pull request is exactly what
merging it does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..build.inputs import resolve_inputs
from ..build.pipeline import BuildReport, Pipeline
from ..build.plan import BuildInputs, plan_builds
from ..build.runner import Runner, runner_for
from ..build.workspace import Workspace
from ..cancel import CancelToken
from ..errors import EXIT_DRIFT, EXIT_INTERRUPTED, EXIT_OK, EXIT_OPERATIONAL, DriftError
from ..manifest.schema import Manifest
from ..progress import Progress
from ..quality.evaluate import evaluate, gate_failures
from ..rollout.desired import DesiredModel, write_release
from ..rollout.fleet import apply_rollout
from ..rollout.host_apply import HostReport, HostStatus
from ..rollout.host_plan import TagKind
from .plan import DeployPlan, manifest_digest


@dataclass
class ApplyResult:
    plan: DeployPlan
    hosts: list[HostReport]
    build: BuildReport = field(default_factory=BuildReport)
    gated: dict[str, list[str]] = field(default_factory=dict)  # tag -> why the quality gate held it back
    forced: dict[str, list[str]] = field(default_factory=dict)  # failing tags rolled out anyway (--force)
    interrupted: bool = False

    @property
    def failed(self) -> list[HostReport]:
        return [h for h in self.hosts if h.status not in (HostStatus.OK, HostStatus.CHANGED)]

    @property
    def changed(self) -> list[HostReport]:
        return [h for h in self.hosts if h.status is HostStatus.CHANGED]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.failed or self.gated:
            return EXIT_OPERATIONAL
        return EXIT_DRIFT if self.changed else EXIT_OK


def _hub_commit(plan: DeployPlan) -> str | None:
    return plan.source.rpartition("@")[2] if "@" in plan.source else None


def _check_inputs_unchanged(manifest: Manifest, plan: DeployPlan, inputs: BuildInputs, workspace: Workspace) -> None:
    now = {t.tag: t.key for t in plan_builds(manifest, inputs, workspace).tags}
    moved = sorted(t.tag for t in plan.builds.tags if t.key is not None and now.get(t.tag) != t.key)
    if moved:
        raise DriftError(f"apply: the inputs changed since the plan was made (build keys of {', '.join(moved[:3])}"
                         f"{' ...' if len(moved) > 3 else ''}); run plan again")


def _build(manifest: Manifest, plan: DeployPlan, tags: list[str], workspace: Workspace, progress: Progress,
           saved: bool, verify_cache: bool) -> tuple[BuildReport, Runner]:
    inputs = resolve_inputs(manifest, workspace, progress, download_model=True, hub_commit=_hub_commit(plan),
                            manifest_path=Path(plan.manifest))
    if saved:
        _check_inputs_unchanged(manifest, plan, inputs, workspace)
    runner = runner_for(manifest, workspace, progress)
    return Pipeline(manifest, inputs, workspace, runner, progress, verify_cache=verify_cache).build(tags), runner


def apply_plan(manifest: Manifest, plan: DeployPlan, workspace: Workspace, progress: Progress, cancel: CancelToken,
               *, saved: bool, force: bool = False, verify_cache: bool = False) -> ApplyResult:
    """Execute `plan`; `saved` (apply --plan) first checks that nothing moved since it was made."""
    if saved and plan.manifest_digest != manifest_digest(manifest):
        raise DriftError(f"apply: {plan.manifest} changed since the plan was made; run plan again")
    result = ApplyResult(plan=plan, hosts=[])
    models: dict[str, DesiredModel] = {t.tag: t.desired() for t in plan.tags}
    creating = {d.tag for h in plan.hosts for d in h.decisions if d.kind is TagKind.CREATE}
    failing = {t.tag: list(t.gate or []) for t in plan.tags if t.gate and t.tag in creating}  # known from the plan
    to_build = sorted(creating if force else creating - set(failing))
    if to_build:
        result.build, runner = _build(manifest, plan, to_build, workspace, progress, saved, verify_cache)
        for artifact in result.build.artifacts:
            models[artifact.tag] = models[artifact.tag].built(artifact)
            write_release(workspace.releases, manifest, artifact)
        unknown = [a for a in result.build.artifacts if plan.planned(a.tag).gate is None]
        if manifest.quality.gated and unknown:
            report = BuildReport(artifacts=unknown, references=result.build.references)
            for quality in evaluate(manifest, report, workspace, runner):
                if reasons := gate_failures(manifest, asdict(quality)):
                    failing[quality.tag] = reasons
    if force:
        result.forced = failing
    else:
        result.gated = failing
    for tag, reasons in result.gated.items():
        progress.warning(f"quality gate: {tag} is not rolled out: {'; '.join(reasons)}")
    for tag, reasons in result.forced.items():
        progress.warning(f"--force: rolling out {tag} although it fails the quality gate: {'; '.join(reasons)}")
    result.hosts = apply_rollout(manifest, plan.hosts, models, set(result.gated), workspace, progress, cancel,
                                 check_observed=saved)
    result.interrupted = cancel.cancelled
    return result
