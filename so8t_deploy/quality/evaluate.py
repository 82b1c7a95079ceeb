"""How much each quant level loses, and the quality gate: orchestration, in the control plane.

The numbers are computed by the runner (an EvalStep: llama.cpp and numpy run in the worker) and
cached in the workspace by the content of everything they depend on: the reference and candidate
GGUFs' sha256, the text, the windows and the pinned llama.cpp. `plan` reads that cache to know,
without running anything, which tags the gate would hold back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources

from ..build.pipeline import BuildReport, BuiltArtifact
from ..build.plan import BuildPlan, TagBuild
from ..build.provenance import llama_cpp_label
from ..build.runner import Runner
from ..build.steps import EvalResult, EvalStep, GgufRecord
from ..build.workspace import Workspace, cache_key
from ..errors import ManifestError
from ..manifest.schema import Manifest


@dataclass(frozen=True)
class QuantQuality:
    variant: str
    tag: str
    quant: str
    reference: str  # the quant level used as reference (f16, bf16 or f32)
    mean_kl: float
    p99_kl: float
    top1: float
    perplexity: float
    size: int
    bits_per_weight: float
    tokens_per_second: float


def gate_failures(manifest: Manifest, metrics: dict) -> list[str]:
    """Why a tag with these metrics fails the manifest's quality gate; empty when it passes."""
    q, failures = manifest.quality, []
    if q.max_mean_kl is not None and metrics["mean_kl"] > q.max_mean_kl:
        failures.append(f"mean KL {metrics['mean_kl']:.4f} > {q.max_mean_kl:g}")
    if q.min_top1 is not None and metrics["top1"] < q.min_top1:
        failures.append(f"top-1 agreement {metrics['top1']:.3f} < {q.min_top1:g}")
    return failures


def eval_text(manifest: Manifest) -> str:
    path = manifest.quality.eval_text
    if path is None:
        return resources.files("so8t_deploy").joinpath("data/eval.txt").read_text(encoding="utf-8")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"quality.eval_text: cannot read {path}: {e.strerror}") from e


def _eval_key(manifest: Manifest, text: str, reference: GgufRecord, candidate: GgufRecord) -> str:
    q = manifest.quality
    return cache_key(stage="eval", reference=reference.sha256, candidate=candidate.sha256,
                     text=hashlib.sha256(text.encode()).hexdigest(), windows=q.windows, context=q.context,
                     llama=llama_cpp_label())


def _reference(variant: str, references: list):
    """The variant's converted GGUF: the most precise float type its ladder has (see convert_outtype)."""
    return next(r for r in references if r.variant == variant)


def cached_gate(manifest: Manifest, plan: BuildPlan, workspace: Workspace) -> dict[str, list[str] | None]:
    """Per tag, the gate's verdict from cached results (empty list: passes), or None when not known yet."""
    if not manifest.quality.gated:
        return {t.tag: [] for t in plan.tags}
    text = eval_text(manifest)
    verdicts: dict[str, list[str] | None] = {}
    for tag in plan.tags:
        reference: TagBuild = _reference(tag.variant, plan.references)
        found = None
        if tag.record is not None and reference.record is not None:
            found = workspace.lookup("eval", _eval_key(manifest, text, reference.record, tag.record))
        verdicts[tag.tag] = gate_failures(manifest, found) if found else None
    return verdicts


def evaluate(manifest: Manifest, report: BuildReport, workspace: Workspace, runner: Runner) -> list[QuantQuality]:
    """Quality of every built tag against its variant's reference; what is not cached is computed."""
    text, q = eval_text(manifest), manifest.quality
    results = []
    for variant in dict.fromkeys(a.variant for a in report.artifacts):
        candidates = [a for a in report.artifacts if a.variant == variant]
        reference: BuiltArtifact = _reference(variant, report.references)
        keys = {a.tag: _eval_key(manifest, text, reference.record, a.record) for a in candidates}
        missing = [a for a in candidates if workspace.lookup("eval", keys[a.tag]) is None]
        if missing:
            result = runner.run(EvalStep(reference=reference.path, candidates=[a.path for a in missing], text=text,
                                         windows=q.windows, context=q.context))
            assert isinstance(result, EvalResult)
            for artifact, metrics in zip(missing, result.metrics, strict=True):
                with workspace.lock(f"eval-{keys[artifact.tag]}"), \
                        workspace.produce("eval", keys[artifact.tag]) as (_, record):
                    record.update(metrics.model_dump(mode="json", exclude={"candidate"}))
        for artifact in candidates:
            m = workspace.lookup("eval", keys[artifact.tag]) or {}
            results.append(QuantQuality(variant, artifact.tag, artifact.quant, reference.quant, m["mean_kl"],
                                        m["p99_kl"], m["top1"], m["perplexity"], artifact.size,
                                        artifact.bits_per_weight, m["tokens_per_second"]))
    return results


def as_json(results: list[QuantQuality]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
