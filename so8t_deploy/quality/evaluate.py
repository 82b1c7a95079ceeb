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
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from ..build.calibration import eval_text
from ..build.pipeline import BuildReport, BuiltArtifact
from ..build.plan import BuildPlan, TagBuild
from ..build.provenance import IMATRIX_KEY, llama_cpp_label
from ..build.runner import Runner
from ..build.steps import EvalStep, GgufRecord
from ..manifest.schema import Manifest
from ..store.workspace import Workspace, cache_key


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
    imatrix: bool = False  # quantized with the manifest's importance matrix
    # The same level quantized without it, on the same windows (None: no importance matrix, a float level, or a
    # type llama.cpp cannot make without one).
    without_mean_kl: float | None = None
    without_top1: float | None = None
    without_size: int | None = None


class Scores(Protocol):
    """What the quality gate reads of a tag's measurement."""

    @property
    def mean_kl(self) -> float: ...

    @property
    def top1(self) -> float: ...


class CachedScores(BaseModel):
    """The gate's numbers out of a cached eval record (which holds more); validated, like any file read back."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    mean_kl: float
    top1: float


def gate_failures(manifest: Manifest, scores: Scores) -> list[str]:
    """Why a tag with these scores fails the manifest's quality gate; empty when it passes."""
    q, failures = manifest.quality, []
    if q.max_mean_kl is not None and scores.mean_kl > q.max_mean_kl:
        failures.append(f"mean KL {scores.mean_kl:.4f} > {q.max_mean_kl:g}")
    if q.min_top1 is not None and scores.top1 < q.min_top1:
        failures.append(f"top-1 agreement {scores.top1:.3f} < {q.min_top1:g}")
    return failures


def _eval_key(manifest: Manifest, text: str, reference: GgufRecord, candidate: GgufRecord) -> str:
    q = manifest.quality
    return cache_key(stage="eval", reference=reference.sha256, candidate=candidate.sha256,
                     text=hashlib.sha256(text.encode()).hexdigest(), windows=q.windows, context=q.context,
                     llama=llama_cpp_label())


class _OfVariant(Protocol):
    @property
    def variant(self) -> str: ...


_R = TypeVar("_R", bound=_OfVariant)  # a planned TagBuild or a BuiltArtifact


def _reference(variant: str, references: list[_R]) -> _R:
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
        verdicts[tag.tag] = gate_failures(manifest, CachedScores.model_validate(found)) if found else None
    return verdicts


def evaluate(manifest: Manifest, report: BuildReport, workspace: Workspace, runner: Runner) -> list[QuantQuality]:
    """Quality of every built tag (and of its level without the importance matrix) against its variant's
    reference; what is not cached is computed."""
    text = eval_text(manifest)
    results = []
    for variant in dict.fromkeys(a.variant for a in report.artifacts):
        reference: BuiltArtifact = _reference(variant, report.references)
        candidates = [a for a in report.artifacts if a.variant == variant]
        baselines = {a.quant: a for a in report.baselines if a.variant == variant}
        metrics = _metrics(manifest, text, reference, [*candidates, *baselines.values()], workspace, runner)
        for artifact in candidates:
            m, without = metrics[artifact.path], baselines.get(artifact.quant)
            w = metrics[without.path] if without else None
            results.append(QuantQuality(variant, artifact.tag, artifact.quant, reference.quant, m["mean_kl"],
                                        m["p99_kl"], m["top1"], m["perplexity"], artifact.size,
                                        artifact.bits_per_weight, m["tokens_per_second"],
                                        imatrix=IMATRIX_KEY in artifact.record.metadata,
                                        without_mean_kl=w["mean_kl"] if w else None,
                                        without_top1=w["top1"] if w else None,
                                        without_size=without.size if without else None))
    return results


def _metrics(manifest: Manifest, text: str, reference: BuiltArtifact, artifacts: list[BuiltArtifact],
             workspace: Workspace, runner: Runner) -> dict[Path, dict[str, Any]]:
    """Each artifact's cached numbers, computing (in one EvalStep) those not cached yet."""
    q = manifest.quality
    keys = {a.path: _eval_key(manifest, text, reference.record, a.record) for a in artifacts}
    missing = [a for a in artifacts if workspace.lookup("eval", keys[a.path]) is None]
    if missing:
        result = runner.run(EvalStep(reference=reference.path, candidates=[a.path for a in missing], text=text,
                                     windows=q.windows, context=q.context))
        for artifact, metrics in zip(missing, result.metrics, strict=True):
            with workspace.lock(f"eval-{keys[artifact.path]}"), \
                    workspace.produce("eval", keys[artifact.path]) as (_, record):
                record.update(metrics.model_dump(mode="json", exclude={"candidate"}))
    return {a.path: workspace.lookup("eval", keys[a.path]) or {} for a in artifacts}


def as_json(results: list[QuantQuality]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
