"""What the commands do, each one library call: plan, apply, smoke, build and eval of a manifest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..build.calibration import check_held_out, eval_text
from ..build.inputs import resolve_inputs
from ..build.pipeline import BuildReport, Pipeline
from ..build.plan import plan_builds
from ..build.runner import runner_for
from ..cancel import CancelToken
from ..chat.setup import resolve_chat
from ..errors import HostError
from ..manifest.schema import Manifest
from ..manifest.secrets import Redactor
from ..progress import SILENT, Progress
from ..quality.evaluate import QuantQuality, evaluate
from ..rollout.desired import DesiredModel
from ..rollout.host_apply import connect, redact_smoke
from ..rollout.render import render_modelfile
from ..rollout.run_context import RunContext
from ..rollout.smoke import SmokeResult, run_smoke_tests
from ..store.workspace import Workspace
from .execute import ApplyOptions, ApplyResult, apply_plan
from .plan import DeployPlan, make_plan
from .saved_plan import load_plan


def plan_manifest(manifest: Manifest, manifest_path: Path, workspace: Workspace, progress: Progress = SILENT, *,
                  offline: bool = False) -> DeployPlan:
    return make_plan(manifest, manifest_path, workspace, progress, offline=offline)


def apply_manifest(manifest: Manifest, manifest_path: Path, workspace: Workspace, progress: Progress = SILENT, *,
                   cancel: CancelToken | None = None, plan_file: Path | None = None, force: bool = False,
                   verify_cache: bool = False) -> ApplyResult:
    """Derive the plan now and execute it; a saved plan (`plan_file`) is checked input that pins and narrows it."""
    options = ApplyOptions(force=force, verify_cache=verify_cache)
    if plan_file is not None:
        options = replace(options, saved=load_plan(plan_file), saved_path=plan_file)
    return apply_plan(RunContext(manifest, workspace, progress, cancel or CancelToken()), manifest_path, options)


def build_manifest(manifest: Manifest, workspace: Workspace, progress: Progress = SILENT, *,
                   manifest_path: Path | None = None, verify_cache: bool = False) -> BuildReport:
    """Every tag's GGUF, reusing whatever the workspace already holds (intact: see Workspace.inspect)."""
    inputs = resolve_inputs(manifest, workspace, progress, download_model=True, manifest_path=manifest_path,
                            verify_cache=verify_cache)
    runner = runner_for(manifest, workspace, progress)
    pipeline = Pipeline(manifest, inputs, workspace, runner, progress, verify_cache=verify_cache)
    return pipeline.build(plan_builds(manifest, inputs, workspace))


def eval_manifest(manifest: Manifest, workspace: Workspace, progress: Progress = SILENT, *,
                  manifest_path: Path | None = None) -> list[QuantQuality]:
    inputs = resolve_inputs(manifest, workspace, progress, download_model=True, manifest_path=manifest_path)
    runner = runner_for(manifest, workspace, progress)
    check_held_out(eval_text(manifest), inputs.calibration)
    report = Pipeline(manifest, inputs, workspace, runner, progress).build(plan_builds(manifest, inputs, workspace),
                                                                         baselines=True)
    return evaluate(manifest, report, workspace, runner)


def _served(manifest: Manifest) -> dict[str, DesiredModel] | None:
    """What each tag must serve (its TEMPLATE, capabilities and conversations), where the model's files are on
    this machine; `smoke` downloads nothing, so a hub model's tags get the prompts only."""
    if not manifest.source.is_local:
        return None
    chat = resolve_chat(manifest.modelfile, Path(manifest.source.model))
    rendered = render_modelfile(manifest.modelfile, Path("model.gguf"), chat)  # the same TEMPLATE for every GGUF
    return {tag: DesiredModel(tag=tag, gguf_name="", template=rendered.template, system=rendered.system,
                              parameters=rendered.parameters, expected_renders=chat.expected,
                              capabilities=chat.capabilities) for tag in manifest.tags()}


def smoke_manifest(manifest: Manifest) -> list[SmokeResult]:
    """Check what every host serves for every tag, as deployed now, and run the smoke tests; a down host is one
    row."""
    tags, redact, served = manifest.tags(), Redactor.for_manifest(manifest), _served(manifest)
    results: list[SmokeResult] = []
    for target in manifest.targets:
        with connect(target) as host:
            try:
                results += run_smoke_tests(host, tags, manifest.smoke, manifest.modelfile.effective_parameters,
                                           desired=served)
            except HostError as e:
                results.append(SmokeResult(target.name, "*", "*", False, str(e), 0.0, 0.0, ""))
    return [redact_smoke(result, redact) for result in results]
