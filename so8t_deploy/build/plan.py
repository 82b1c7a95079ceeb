"""The build plan: every step a manifest needs and the cache key of its output, computed without building.

A key hashes everything that affects an artifact's bytes: the input digests (the source model's
files and each adapter's, in fold order), the scales and dtype, the pinned llama.cpp and the
GGUF metadata. With the keys known, `plan` can tell which artifacts are already built and what a
host's copy of a tag must report, before a single step runs. When an input cannot be known
without downloading it (a hub model while the hub is unreachable), the keys that depend on it
are None and the step says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import __version__
from ..frozen import Frozen
from ..manifest.quant_types import lookup_quant_type
from ..manifest.schema import AdapterRef, Manifest
from ..store.workspace import Workspace, cache_key
from .calibration import Calibration
from .provenance import IMATRIX_KEY, gguf_metadata, llama_cpp_label
from .steps import GgufRecord


@dataclass(frozen=True)
class AdapterInput:
    ref: AdapterRef
    digest: str


@dataclass(frozen=True)
class BuildInputs:
    """What the keys are made of: resolved once per plan, and again (and compared) by apply."""

    source_label: str  # provenance: a local path, or org/name@commit
    model_digest: str | None  # None: unknown until downloaded (see note)
    adapters: tuple[AdapterInput, ...]
    source_dir: Path | None = None  # where the model is on this machine, once known
    chat_dir: Path | None = None  # where its tokenizer and chat template files are (before a hub model's download)
    note: str = ""
    hub_commit: str | None = None  # the commit a hub model resolved to
    calibration: Calibration | None = None  # quantize.imatrix's data, as used; None: none declared, or not known yet

    @property
    def adapter_digests(self) -> list[dict[str, str]]:
        return [{"kind": a.ref.kind, "digest": a.digest} for a in self.adapters]


class BuildStep(Frozen):
    stage: Literal["bake", "convert", "imatrix", "quantize"]
    variant: str
    quant: str | None = None  # the GGUF type a convert or quantize writes
    key: str | None  # None: known only after an input is downloaded (see note)
    upstream: str | None = None  # the key of the artifact this step reads
    cached: bool = False
    note: str = ""


class TagBuild(Frozen):
    """How one tag's GGUF is made, what identifies it on a host, and what it is once built."""

    tag: str
    variant: str
    quant: str
    stage: Literal["convert", "quantize"]
    key: str | None
    file_name: str
    identity: dict[str, str] | None  # IDENTITY_KEYS (and so8t.imatrix_key when quantized with one); None if unknown
    record: GgufRecord | None = None  # when already built
    imatrix_key: str | None = None  # the importance matrix it is quantized with

    @property
    def is_float(self) -> bool:
        return self.quant in ("f32", "bf16", "f16")


class BuildPlan(Frozen):
    steps: list[BuildStep]
    tags: list[TagBuild]
    references: list[TagBuild]  # each variant's converted float GGUF (the quality gate's reference)
    baselines: list[TagBuild] = []  # with an importance matrix: the same levels without one, which `eval` compares

    def tag(self, name: str) -> TagBuild:
        return next(t for t in self.tags if t.tag == name)


IDENTITY_KEYS = ("so8t.bake_key", "so8t.llama_cpp", "general.file_type")  # what identifies a GGUF's bytes


def convert_outtype(ladder: list[str]) -> str:
    """The float type to convert to once, from which every quant level is made.

    f16 unless the ladder itself needs more: f32 when it asks for f32, or for both f16 and
    bf16 (neither can be made losslessly from the other); bf16 when it asks for bf16.
    """
    if "f32" in ladder or {"f16", "bf16"} <= set(ladder):
        return "f32"
    return "bf16" if "bf16" in ladder else "f16"


def _record(workspace: Workspace, stage: str, key: str | None) -> GgufRecord | None:
    found = workspace.lookup(stage, key) if key else None
    return GgufRecord.from_marker(found) if found else None


def variant_keys(manifest: Manifest, inputs: BuildInputs, variant: str) -> tuple[str, dict[str, str], str]:
    """(bake key, GGUF metadata, convert key) of one variant; the inputs' model digest must be known."""
    scales = manifest.bake.variants[variant].as_dict()
    bake_key = cache_key(stage="bake", tool=__version__, model=inputs.model_digest, adapters=inputs.adapter_digests,
                         scales=scales, dtype=manifest.bake.dtype)
    metadata = gguf_metadata(source=inputs.source_label, adapters=inputs.adapter_digests, scales=scales,
                             variant=variant, manifest_name=manifest.name, bake_key=bake_key)
    convert_key = cache_key(stage="convert", bake=bake_key, outtype=convert_outtype(manifest.quantize.types),
                            llama=llama_cpp_label(), metadata=metadata, **_split(manifest))
    return bake_key, metadata, convert_key


def _split(manifest: Manifest) -> dict[str, int]:
    """The split size as a key field, only when set: the keys of unsplit builds stay what they were."""
    size = manifest.quantize.split_max_size
    return {} if size is None else {"split_max_size": size}


def imatrix_key(manifest: Manifest, calibration: Calibration | None, convert_key: str | None) -> str | None:
    """The key of a variant's importance matrix: its float GGUF, the calibration text as used, the settings."""
    imatrix = manifest.quantize.imatrix
    if imatrix is None or calibration is None or convert_key is None:
        return None
    return cache_key(stage="imatrix", convert=convert_key, calibration=calibration.digest,
                     dataset=calibration.dataset, parse_special=calibration.parse_special, ctx=imatrix.ctx,
                     chunks=imatrix.chunks, llama=llama_cpp_label())


def quantize_key(manifest: Manifest, convert_key: str, quant: str, imatrix: str | None) -> str:
    fields: dict[str, object] = {"convert": convert_key, "quant": quant, "llama": llama_cpp_label()}
    if imatrix is not None:
        fields["imatrix"] = imatrix
    return cache_key(stage="quantize", **fields, **_split(manifest))


def plan_builds(manifest: Manifest, inputs: BuildInputs, workspace: Workspace) -> BuildPlan:
    outtype = convert_outtype(manifest.quantize.types)
    steps: list[BuildStep] = []
    tags: list[TagBuild] = []
    references: list[TagBuild] = []
    baselines: list[TagBuild] = []
    note = inputs.note if inputs.model_digest is None else ""
    for variant in manifest.bake.variants:
        bake_key = convert_key = None
        if inputs.model_digest is not None:
            bake_key, _, convert_key = variant_keys(manifest, inputs, variant)
        steps.append(BuildStep(stage="bake", variant=variant, key=bake_key, note=note,
                               cached=bool(bake_key and workspace.lookup("bake", bake_key))))
        converted = _tag_build(manifest, variant, outtype, "convert", convert_key, bake_key, workspace)
        steps.append(BuildStep(stage="convert", variant=variant, quant=outtype, key=convert_key, upstream=bake_key,
                               cached=converted.record is not None, note=note))
        references.append(converted)
        matrix = imatrix_key(manifest, inputs.calibration, convert_key)
        if any(uses_imatrix(manifest, quant) for quant in manifest.quantize.types):
            steps.append(BuildStep(stage="imatrix", variant=variant, key=matrix, upstream=convert_key, note=note,
                                   cached=bool(matrix and workspace.lookup("imatrix", matrix))))
        for quant in manifest.quantize.types:
            if quant == outtype:
                tags.append(converted)
                continue
            with_matrix = uses_imatrix(manifest, quant)
            key = quantize_key(manifest, convert_key, quant, matrix if with_matrix else None) \
                if convert_key and (matrix or not with_matrix) else None
            built = _tag_build(manifest, variant, quant, "quantize", key, bake_key, workspace,
                               matrix if with_matrix else None, unknown=with_matrix and matrix is None)
            steps.append(BuildStep(stage="quantize", variant=variant, quant=quant, key=key,
                                   upstream=matrix if with_matrix else convert_key, cached=built.record is not None,
                                   note=note))
            tags.append(built)
            if with_matrix and not lookup_quant_type(quant).needs_imatrix:
                plain = quantize_key(manifest, convert_key, quant, None) if convert_key else None
                baselines.append(_tag_build(manifest, variant, quant, "quantize", plain, bake_key, workspace))
    return BuildPlan(steps=steps, tags=tags, references=references, baselines=baselines)


def uses_imatrix(manifest: Manifest, quant: str) -> bool:
    """Whether the manifest's importance matrix goes into this level: every quantized one, not a float copy."""
    return manifest.quantize.imatrix is not None and not lookup_quant_type(quant).is_float


def _tag_build(manifest: Manifest, variant: str, quant: str, stage: Literal["convert", "quantize"], key: str | None,
               bake_key: str | None, workspace: Workspace, matrix: str | None = None, *,
               unknown: bool = False) -> TagBuild:
    identity = None
    if bake_key is not None and not unknown:  # unknown: its importance matrix is not known yet
        values = (bake_key, llama_cpp_label(), str(lookup_quant_type(quant).ftype))
        identity = dict(zip(IDENTITY_KEYS, values, strict=True)) | ({IMATRIX_KEY: matrix} if matrix else {})
    return TagBuild(tag=manifest.tag(variant, quant), variant=variant, quant=quant, stage=stage, key=key,
                    file_name=f"{manifest.name}-{variant}-{quant}.gguf", identity=identity,
                    record=_record(workspace, stage, key), imatrix_key=matrix)
