"""Execute a build plan: bake -> convert -> quantize, only for the tags asked for, through the workspace.

The pipeline runs the plan's steps as they are: every argument of a worker step (scales, dtype, metadata,
types, importance-matrix settings) comes from the planned step, never from the manifest again, and the
inputs on this machine must still be the ones the steps were planned on.

Each step runs at most once per key: under the key's lock, a second process finds the first
one's published artifact and reuses it. A step's output is published atomically with its
record (for a GGUF: size, sha256, bits per weight, file type), which is all the control plane
ever reads back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BuildError, DriftError
from ..manifest.schema import Manifest, Scales
from ..progress import Progress
from ..store.workspace import Workspace
from .plan import (
    BuildInputs,
    BuildPlan,
    PlannedBake,
    PlannedConvert,
    PlannedImatrix,
    PlannedQuantize,
    TagBuild,
)
from .provenance import imatrix_metadata
from .runner import Runner
from .steps import BakeStep, ConvertStep, GgufRecord, ImatrixResult, ImatrixStep, QuantizeStep

CALIBRATION_FILE = "calibration.txt"  # beside an importance matrix: the text it was computed on, as used


@dataclass(frozen=True)
class BuiltImatrix:
    path: Path
    key: str
    record: ImatrixResult


@dataclass(frozen=True)
class BuiltArtifact:
    tag: str
    variant: str
    quant: str
    path: Path
    record: GgufRecord

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def sha256(self) -> str:
        return self.record.sha256

    @property
    def bits_per_weight(self) -> float:
        return self.record.bits_per_weight


@dataclass
class BuildReport:
    artifacts: list[BuiltArtifact] = field(default_factory=list)  # the tags asked for
    references: list[BuiltArtifact] = field(default_factory=list)  # each variant's converted float GGUF
    baselines: list[BuiltArtifact] = field(default_factory=list)  # the tags' levels without the importance matrix
    built: int = 0  # steps that ran
    reused: int = 0  # steps found complete in the workspace


class Pipeline:
    def __init__(self, manifest: Manifest, inputs: BuildInputs, workspace: Workspace, runner: Runner,
                 progress: Progress, *, verify_cache: bool = False):
        if inputs.source_dir is None or inputs.model_digest is None:
            raise BuildError("internal: a build needs the source model on this machine")
        self.source_dir: Path = inputs.source_dir
        self.manifest, self.inputs, self.workspace = manifest, inputs, workspace
        self.runner, self.progress, self.verify_cache = runner, progress, verify_cache
        self.report = BuildReport()

    def build(self, plan: BuildPlan, tags: list[str] | None = None, *, baselines: bool = False) -> BuildReport:
        """Run `plan`'s steps for the GGUFs of `tags` (default: every tag) and each involved variant's reference;
        with `baselines`, also their levels quantized without the importance matrix (what `eval` compares them
        with)."""
        wanted = [t for t in plan.tags if tags is None or t.tag in tags]
        for variant in dict.fromkeys(t.variant for t in wanted):
            converted = self._convert(plan, next(r for r in plan.references if r.variant == variant))
            self.report.references.append(converted)
            mine = [t for t in wanted if t.variant == variant]
            # The variant's one importance matrix; made on first use: not at all when every level using it is
            # built already.
            key = next((t.imatrix_key for t in mine if t.imatrix_key), None)
            matrix = functools.cache(functools.partial(self._imatrix, plan.step(key, PlannedImatrix), converted)) \
                if key else None
            for tag in mine:
                self.report.artifacts.append(converted if tag.stage == "convert" else self._quantize(
                    tag, plan.step(tag.key, PlannedQuantize), converted, matrix if tag.imatrix_key else None))
            if baselines:
                names = {(t.variant, t.quant) for t in mine}
                for baseline in (b for b in plan.baselines if (b.variant, b.quant) in names):
                    self.report.baselines.append(
                        self._quantize(baseline, plan.step(baseline.key, PlannedQuantize), converted, None))
        return self.report

    def _step(self, stage: str, key: str, produce: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        """The artifact for `key`: published already, or produced now under the key's lock (`produce`
        announces itself once its own inputs are ready)."""
        found = self._intact(stage, key)
        if found is None:
            with self.workspace.lock(f"{stage}-{key}"):
                found = self._intact(stage, key)  # published while we waited for the lock
                if found is None:
                    with self.workspace.produce(stage, key) as (staging, record):
                        record.update(produce(staging))
                    self.report.built += 1
                    return self.workspace.artifact_dir(stage, key), self.workspace.lookup(stage, key) or record
        self.report.reused += 1
        return self.workspace.artifact_dir(stage, key), found

    def _intact(self, stage: str, key: str) -> dict[str, Any] | None:
        """A published artifact that is still what was published; a damaged one is said and rebuilt."""
        found, damage = self.workspace.inspect(stage, key, verify=self.verify_cache)
        if damage:
            self.progress.warning(f"{damage}: rebuilding it")
        return found

    def _bake(self, step: PlannedBake) -> Path:
        if step.key is None or step.model != self.inputs.model_digest or step.adapters != self.inputs.adapter_records:
            raise DriftError(f"{step.label}: the source model or an adapter is no longer what the step was planned "
                             "on; nothing was built from it; run plan again")

        def bake(staging: Path) -> dict[str, Any]:
            worker = BakeStep(model_dir=self.source_dir, adapters=[a.ref for a in self.inputs.adapters],
                              out_dir=staging / "model", scales=Scales.model_validate(step.scales), dtype=step.dtype,
                              digests_file=self.workspace.digests_file, label=step.variant)
            self.progress.step(f"bake {step.variant} ...")
            result = self.runner.run(worker)
            return {"variant": step.variant, "scales": step.scales, **result.model_dump()}

        directory, _ = self._step("bake", step.key, bake)
        return directory / "model"

    def _convert(self, plan: BuildPlan, reference: TagBuild) -> BuiltArtifact:
        step = plan.step(reference.key, PlannedConvert)
        baked = plan.step(step.bake, PlannedBake)
        if step.key is None or step.metadata is None or step.quant is None:
            raise BuildError(f"internal: {step.label} is not known yet")
        metadata, outtype = step.metadata, step.quant

        def convert(staging: Path) -> dict[str, Any]:
            worker = ConvertStep(model_dir=self._bake(baked), out_file=staging / reference.file_name,
                                 outtype=outtype, metadata=metadata, split_max_size=step.split_max_size)
            self.progress.step(f"convert {step.variant} -> {outtype} ...")
            return self.runner.run(worker).model_dump()

        directory, record = self._step("convert", step.key, convert)
        return _artifact(reference, directory, record)

    def _imatrix(self, step: PlannedImatrix, converted: BuiltArtifact) -> BuiltImatrix:
        calibration = self.inputs.calibration
        if step.key is None or step.dataset is None or step.parse_special is None:
            raise BuildError(f"internal: {step.label} is not known yet")
        if calibration is None or calibration.digest != step.calibration:
            raise DriftError(f"{step.label}: the calibration text is no longer what the step was planned on; "
                             "nothing was built from it; run plan again")
        dataset, parse_special = step.dataset, step.parse_special

        def compute(staging: Path) -> dict[str, Any]:
            text_file = staging / CALIBRATION_FILE
            text_file.write_text(calibration.text, encoding="utf-8")
            worker = ImatrixStep(gguf=converted.path, text_file=text_file,
                                 out_file=staging / f"{self.manifest.name}-{step.variant}.imatrix.gguf",
                                 dataset=dataset, ctx=step.ctx, chunks=step.chunks, parse_special=parse_special)
            self.progress.step(f"imatrix {step.variant} <- {dataset} ...")
            return self.runner.run(worker).model_dump()

        directory, record = self._step("imatrix", step.key, compute)
        result = ImatrixResult.from_marker(record)
        return BuiltImatrix(directory / result.file, step.key, result)

    def _quantize(self, tag: TagBuild, step: PlannedQuantize, converted: BuiltArtifact,
                  matrix: Callable[[], BuiltImatrix] | None) -> BuiltArtifact:
        """The tag's GGUF; quantized with the variant's importance matrix when `matrix` is given, which is only
        computed (or read from the workspace) when this step, or another of the variant, has to run."""
        if step.key is None or step.quant is None:
            raise BuildError(f"internal: {step.label} is not known yet")
        quant = step.quant

        def quantize(staging: Path) -> dict[str, Any]:
            built = matrix() if matrix is not None else None
            metadata: dict[str, str | int] = {}
            if built is not None:
                calibration = self.inputs.calibration
                assert calibration is not None  # _imatrix
                metadata = imatrix_metadata(file=built.record.file, datasets=built.record.datasets,
                                            entries=built.record.entries, chunks=built.record.chunks,
                                            calibration=calibration.digest, imatrix_key=built.key)
            worker = QuantizeStep(in_file=converted.path, out_file=staging / tag.file_name, quant=quant,
                                  imatrix=built.path if built else None, metadata=metadata,
                                  split_max_size=step.split_max_size)
            self.progress.step(f"quantize {step.variant} -> {quant}{' (imatrix)' if built else ''} ...")
            return self.runner.run(worker).model_dump()

        directory, record = self._step("quantize", step.key, quantize)
        return _artifact(tag, directory, record)


def _artifact(tag: TagBuild, directory: Path, record: dict[str, Any]) -> BuiltArtifact:
    gguf = GgufRecord.from_marker(record)
    return BuiltArtifact(tag.tag, tag.variant, tag.quant, directory / gguf.file, gguf)
