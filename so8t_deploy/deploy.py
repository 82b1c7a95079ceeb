"""The online commands: plan, apply and smoke, composed from build, render and rollout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .build import BuildReport, Log, build
from .console import transfer_progress
from .desired import DesiredModel, desired_models
from .errors import HostError
from .manifest import Manifest
from .rollout import HostPlan, HostReport, apply_rollout, connect, plan_host
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
        return [h for h in self.hosts if h.status != "ok"]


def _state_dir(cache_dir: Path) -> Path:
    return cache_dir / "hosts"


def _releases(cache_dir: Path) -> Path:
    return cache_dir.parent / "releases"


def plan_online(manifest: Manifest, cache_dir: Path) -> list[HostPlan]:
    """Per host, what apply would do; builds nothing and changes nothing on any host."""
    report = build(manifest, cache_dir, runner_for(manifest, cache_dir), dry_run=True)
    desired = desired_models(manifest, report, releases=None)
    return [plan_host(manifest, target, desired, _state_dir(cache_dir), report.unbuilt)
            for target in manifest.targets]


def quality_gate(manifest: Manifest, report: BuildReport, cache_dir: Path) -> dict[str, list[str]]:
    """Tags that fail the manifest's quality thresholds, with the reasons; empty when there is no gate."""
    if not manifest.quality.gated:
        return {}
    from .quality import evaluate

    failures = {r.tag: r.gate_failures(manifest) for r in evaluate(manifest, report, cache_dir)}
    return {tag: reasons for tag, reasons in failures.items() if reasons}


def apply_manifest(manifest: Manifest, cache_dir: Path, log: Log, force: bool = False) -> ApplyResult:
    report = build(manifest, cache_dir, runner_for(manifest, cache_dir), log=log)
    failing = quality_gate(manifest, report, cache_dir)
    desired = desired_models(manifest, report, releases=_releases(cache_dir))
    if not force:
        desired = [m for m in desired if m.tag not in failing]
    with transfer_progress() as progress:
        hosts = apply_rollout(manifest, desired, _state_dir(cache_dir), progress)
    return ApplyResult(report, hosts, gated={} if force else failing, forced=failing if force else {})


def smoke_manifest(manifest: Manifest, cache_dir: Path) -> list[SmokeResult]:
    """Run the smoke tests against every tag on every host, as deployed now."""
    tags = manifest.tags()
    results: list[SmokeResult] = []
    for target in manifest.targets:
        host = connect(target)
        try:
            results += run_smoke_tests(host, tags, manifest.smoke, manifest.modelfile.effective_parameters)
        except HostError as e:
            results.append(SmokeResult(target.name, "*", "*", False, str(e), 0.0, 0.0, ""))
        finally:
            host.close()
    return results


__all__ = ["ApplyResult", "DesiredModel", "apply_manifest", "plan_online", "smoke_manifest"]
