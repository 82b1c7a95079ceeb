"""Execute one worker step in this process: what the local runner calls, and the container's entry point.

This is the only module of the build that reaches the ML stack (torch through the bake, llama.cpp,
numpy for the metrics), and it imports them only when a step runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .. import __version__
from ..errors import BuildError
from ..fsutil import write_atomic
from ..progress import SILENT, Progress
from ..store.hashing import DigestCache, combined_digest, sha256_file
from ..validation import first_error
from .steps import (
    BakeResult,
    BakeStep,
    ConvertStep,
    EvalStep,
    GgufRecord,
    ImatrixResult,
    ImatrixStep,
    InspectStep,
    QuantizeStep,
    StepEnvelope,
    WorkerStep,
)


def gguf_record(path: Path) -> GgufRecord:
    """The record of a GGUF, or of a split set given its first file (sha256 then over the parts' digests)."""
    from ..external.gguf_info import read_gguf_info

    info = read_gguf_info(path)
    digests = {part.name: sha256_file(part) for part in info.parts}
    split = len(info.parts) > 1
    return GgufRecord(file=path.name, size=sum(part.stat().st_size for part in info.parts),
                      sha256=combined_digest(digests) if split else digests[path.name],
                      bits_per_weight=round(info.bits_per_weight, 4), file_type=info.file_type,
                      architecture=info.architecture, metadata=info.metadata,
                      parts=[part.name for part in info.parts] if split else [])


def _split(path: Path, max_bytes: int | None) -> Path:
    """The file to record: `path` itself, or the first of the split files that replace it."""
    if max_bytes is None:
        return path
    from ..external.gguf_split import split_gguf

    parts = split_gguf(path, path.parent, path.name.removesuffix(".gguf"), max_bytes)
    if parts != [path]:
        path.unlink()
    return parts[0]


def _bake(step: BakeStep, progress: Progress) -> BakeResult:
    from ..bake.bake import bake_model

    adapters = [(a.kind, a.path, a.allow_base_mismatch) for a in step.adapters]
    # The bar counts the tensor bytes written; the shards' size is the honest estimate before the bake
    # (headers, and any dtype change or grown vocabulary, move it a little): the bar is filled at the end.
    total = sum(p.stat().st_size for p in step.model_dir.glob("*.safetensors"))
    advance, written = progress.transfer(f"bake {step.label}", total), [0]

    def count(n: int) -> None:
        written[0] += n
        if advance is not None:
            advance(n)

    result = bake_model(step.model_dir, adapters, step.out_dir, step.scales, dtype=step.dtype, on_progress=count,
                        digests=DigestCache(step.digests_file))
    if advance is not None and written[0] < total:
        advance(total - written[0])
    return BakeResult(folded=result.folded, copied=result.copied)


def _percent(progress: Progress, label: str) -> Callable[[int], None]:
    """A 0-100 bar; the callback takes the percentage done so far."""
    advance, shown = progress.transfer(label, 100, unit="percent"), [0]

    def update(percent: int) -> None:
        if advance is not None and percent > shown[0]:
            advance(percent - shown[0])
            shown[0] = percent

    return update


def _convert(step: ConvertStep, progress: Progress, converter_root: Path | None) -> GgufRecord:
    from ..external.llamacpp import convert_to_gguf, locate_converter

    convert_to_gguf(locate_converter(converter_root), step.model_dir, step.out_file, step.outtype,
                    metadata=step.metadata, on_progress=_percent(progress, f"convert -> {step.out_file.name}"))
    return gguf_record(_split(step.out_file, step.split_max_size))


def _imatrix(step: ImatrixStep, progress: Progress) -> ImatrixResult:
    from ..external.imatrix_compute import chunk_progress, compute_imatrix

    report = chunk_progress(progress.step, f"imatrix {step.gguf.name} <- {step.dataset}")
    info = compute_imatrix(step.gguf, step.text_file, step.out_file, dataset=step.dataset, ctx=step.ctx,
                           chunks=step.chunks, parse_special=step.parse_special, on_progress=report)
    return ImatrixResult(file=step.out_file.name, entries=info.entries, chunks=info.chunks,
                         chunk_size=info.chunk_size, datasets=list(info.datasets), sha256=sha256_file(step.out_file))


def _quantize(step: QuantizeStep, progress: Progress) -> GgufRecord:
    from ..external.llamacpp import quantize_gguf
    from ..manifest.quant_types import lookup_quant_type

    update = _percent(progress, f"quantize -> {step.out_file.name}")
    quantize_gguf(step.in_file, step.out_file, lookup_quant_type(step.quant), imatrix=step.imatrix,
                  metadata=step.metadata, on_progress=lambda done, total: update(100 * done // max(total, 1)))
    return gguf_record(_split(step.out_file, step.split_max_size))


def _evaluate(step: EvalStep) -> BaseModel:
    from ..build.quality_metrics import evaluate_step

    return evaluate_step(step)


def execute(step: WorkerStep, progress: Progress = SILENT, converter_root: Path | None = None) -> BaseModel:
    """Run one step here; the result is an instance of `step.result_model`."""
    if isinstance(step, BakeStep):
        return _bake(step, progress)
    if isinstance(step, ConvertStep):
        return _convert(step, progress, converter_root)
    if isinstance(step, ImatrixStep):
        return _imatrix(step, progress)
    if isinstance(step, QuantizeStep):
        return _quantize(step, progress)
    if isinstance(step, InspectStep):
        return gguf_record(step.path)
    return _evaluate(step)


def run_envelope(spec_file: Path, progress: Progress = SILENT) -> None:
    """The container's side: read the envelope, run its step, write the result where it says."""
    try:
        envelope = StepEnvelope.model_validate_json(spec_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise BuildError(f"worker: cannot read the step spec {spec_file}: {e.strerror} (the docker runner mounts "
                         "the workspace at its own path)") from e
    except ValidationError as e:
        raise BuildError(f"worker: {spec_file} is not a step this worker (so8t-deploy {__version__}) can run: "
                         f"{first_error(e)}; build the image from the so8t-deploy that drives it") from e
    result = execute(envelope.step, progress)
    write_atomic(envelope.result_file, result.model_dump_json())
