"""The online commands: plan, apply and smoke, composed from build, render and rollout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .build import BuildReport, build
from .cancel import CancelToken
from .desired import desired_models
from .errors import HostError
from .manifest import Manifest
from .progress import SILENT, Progress
from .rollout import HostPlan, HostReport, HostStatus, apply_rollout, connect, plan_hosts
from .runner import runner_for
from .smoke import SmokeResult, run_smoke_tests


@dataclass(frozen=True)
class ApplyResult:
    build: BuildReport
    hosts: list[HostReport]
    gated: dict[str, list[str]] = field(default_factory=dict)  # tag -> why the quality gate held it back
    forced: dict[str, list[str]] = field(default_factory=dict)  # failing tags rolled out anyway (--force)

    @property
    def failed(self) -> list[HostReport]:
        return [h for h in self.hosts if h.status is not HostStatus.OK]


def _state_dir(cache_dir: Path) -> Path:
    return cache_dir / "hosts"


def _releases(cache_dir: Path) -> Path:
    return cache_dir.parent / "releases"


def plan_online(manifest: Manifest, cache_dir: Path) -> list[HostPlan]:
    """Per host, what apply would do; builds nothing and changes nothing on any host."""
    report = build(manifest, cache_dir, runner_for(manifest, cache_dir), dry_run=True)
    desired = desired_models(manifest, report, releases=None)
    return plan_hosts(manifest, desired, _state_dir(cache_dir), report.unbuilt)


def quality_gate(manifest: Manifest, report: BuildReport, cache_dir: Path) -> dict[str, list[str]]:
    """Tags that fail the manifest's quality thresholds, with the reasons; empty when there is no gate."""
    if not manifest.quality.gated:
        return {}
    from .quality import evaluate

    failures = {r.tag: r.gate_failures(manifest) for r in evaluate(manifest, report, cache_dir)}
    return {tag: reasons for tag, reasons in failures.items() if reasons}


def apply_manifest(manifest: Manifest, cache_dir: Path, progress: Progress = SILENT, force: bool = False,
                   cancel: CancelToken | None = None) -> ApplyResult:
    cancel = cancel or CancelToken()
    report = build(manifest, cache_dir, runner_for(manifest, cache_dir), log=progress.step)
    failing = quality_gate(manifest, report, cache_dir)
    desired = desired_models(manifest, report, releases=_releases(cache_dir))
    if not force:
        desired = [m for m in desired if m.tag not in failing]
    hosts = apply_rollout(manifest, desired, _state_dir(cache_dir), progress, cancel)
    return ApplyResult(report, hosts, gated={} if force else failing, forced=failing if force else {})


def smoke_manifest(manifest: Manifest) -> list[SmokeResult]:
    """Run the smoke tests against every tag on every host, as deployed now; a down host is one row."""
    tags = manifest.tags()
    results: list[SmokeResult] = []
    for target in manifest.targets:
        with connect(target) as host:
            try:
                results += run_smoke_tests(host, tags, manifest.smoke, manifest.modelfile.effective_parameters)
            except HostError as e:
                results.append(SmokeResult(target.name, "*", "*", False, str(e), 0.0, 0.0, ""))
    return results
