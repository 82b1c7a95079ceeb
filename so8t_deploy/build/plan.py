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
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from .. import __version__
from ..errors import BuildError
from ..frozen import Frozen
from ..manifest.quant_types import lookup_quant_type
from ..manifest.schema import AdapterRef, Manifest
from ..store.workspace import Workspace, cache_key
from .calibration import Calibration
from .provenance import IMATRIX_KEY, gguf_metadata, llama_cpp_label
from .steps import GgufRecord


class AdapterDigest(Frozen):
    """An adapter as a key sees it: its kind and the digest of its files."""

    kind: str
    digest: str


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
    def adapter_records(self) -> list[AdapterDigest]:
        return [AdapterDigest(kind=a.ref.kind, digest=a.digest) for a in self.adapters]

    @property
    def adapter_digests(self) -> list[dict[str, str]]:
        return [a.model_dump() for a in self.adapter_records]


class _PlannedStep(Frozen):
    """One build step as planned: its content (everything its output's bytes depend on) and the key that hashes it.

    The step is what apply runs: the pipeline reads its arguments from these fields, never from the manifest
    again. A key that does not hash its content (a plan edited by hand) is refused when the step is read.
    """

    stage: str
    variant: str
    quant: str | None = None  # the GGUF type a convert or quantize writes
    key: str | None  # cache_key(**content()); None: an input is unknown until downloaded (see note)
    cached: bool = False  # its output was in the workspace when planned (apply looks again)
    note: str = ""

    def content(self) -> dict[str, object]:
        raise NotImplementedError

    @property
    def upstream(self) -> str | None:
        """The key of the artifact this step reads."""
        return None

    @property
    def label(self) -> str:
        return f"the {self.stage} step of {self.variant}" + (f" ({self.quant})" if self.quant else "")

    @model_validator(mode="after")
    def _key_hashes_content(self) -> Self:
        if self.key is not None and cache_key(**self.content()) != self.key:
            raise PydanticCustomError("edited_step", "{step}: its key does not hash its content",
                                      {"step": self.label})
        return self


class PlannedBake(_PlannedStep):
    stage: Literal["bake"] = "bake"
    tool: str  # so8t-deploy's version: the fold is its code
    model: str | None  # the source model's digest
    adapters: list[AdapterDigest]  # in fold order
    scales: dict[str, float]
    dtype: str

    def content(self) -> dict[str, object]:
        return {"stage": "bake", "tool": self.tool, "model": self.model,
                "adapters": [a.model_dump() for a in self.adapters], "scales": self.scales, "dtype": self.dtype}


class PlannedConvert(_PlannedStep):
    stage: Literal["convert"] = "convert"
    bake: str | None  # the baked model's key
    llama: str
    metadata: dict[str, str] | None  # the so8t.* keys written into the GGUF; None while the bake key is unknown
    split_max_size: int | None = None

    @property
    def upstream(self) -> str | None:
        return self.bake

    def content(self) -> dict[str, object]:
        return {"stage": "convert", "bake": self.bake, "outtype": self.quant, "llama": self.llama,
                "metadata": self.metadata, **_split(self.split_max_size)}


class PlannedImatrix(_PlannedStep):
    stage: Literal["imatrix"] = "imatrix"
    convert: str | None  # the float GGUF's key
    calibration: str | None  # the calibration text's sha256, as used
    dataset: str | None
    parse_special: bool | None
    ctx: int
    chunks: int | None
    llama: str

    @property
    def upstream(self) -> str | None:
        return self.convert

    def content(self) -> dict[str, object]:
        return {"stage": "imatrix", "convert": self.convert, "calibration": self.calibration,
                "dataset": self.dataset, "parse_special": self.parse_special, "ctx": self.ctx,
                "chunks": self.chunks, "llama": self.llama}


class PlannedQuantize(_PlannedStep):
    stage: Literal["quantize"] = "quantize"
    convert: str | None  # the float GGUF's key
    imatrix: str | None = None  # the importance matrix's key, when quantized with one
    llama: str
    split_max_size: int | None = None

    @property
    def upstream(self) -> str | None:
        return self.imatrix or self.convert

    def content(self) -> dict[str, object]:
        matrix = {} if self.imatrix is None else {"imatrix": self.imatrix}
        return {"stage": "quantize", "convert": self.convert, "quant": self.quant, "llama": self.llama, **matrix,
                **_split(self.split_max_size)}


BuildStep = Annotated[PlannedBake | PlannedConvert | PlannedImatrix | PlannedQuantize, Field(discriminator="stage")]


S = TypeVar("S", bound=_PlannedStep)


def _keyed(step_type: type[S], known: bool, **fields: Any) -> S:
    """A step with its key: the hash of its content, when every input of it is known."""
    unkeyed = step_type(key=None, **fields)
    return unkeyed.model_copy(update={"key": cache_key(**unkeyed.content()) if known else None})


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


IDENTITY_KEYS = ("so8t.bake_key", "so8t.llama_cpp", "general.file_type")  # what identifies a GGUF's bytes
# What a step's content takes from the inputs and the tools rather than from the manifest: a difference there is
# drift (the inputs moved since the plan), anywhere else the plan is not the manifest's.
_INPUT_FIELDS = {"tool", "model", "adapters", "llama", "calibration", "dataset", "parse_special"}
_INPUT_METADATA = {"so8t.source_model", "so8t.adapters", "so8t.tool_version", "so8t.llama_cpp"}


class BuildPlan(Frozen):
    """The steps a manifest needs, in the order they run, and per tag the step that makes its GGUF.

    Consistent by construction: every key hashes its step's content, every step reads a step of the plan, and
    every tag's identity is its step's. A saved plan that is not (edited by hand) is refused when it is read.
    """

    steps: list[BuildStep]
    tags: list[TagBuild]
    references: list[TagBuild]  # each variant's converted float GGUF (the quality gate's reference)
    baselines: list[TagBuild] = []  # with an importance matrix: the same levels without one, which `eval` compares
    baseline_steps: list[PlannedQuantize] = []  # the steps that make them (run by `eval` only)

    def tag(self, name: str) -> TagBuild:
        return next(t for t in self.tags if t.tag == name)

    def step(self, key: str | None, kind: type[S]) -> S:
        """The step whose output has `key`."""
        found = next((s for s in (*self.steps, *self.baseline_steps) if key is not None and s.key == key), None)
        if not isinstance(found, kind):
            raise BuildError(f"internal: the build plan has no {kind.__name__} with key {key}")
        return found

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (problem := self._inconsistency()) is not None:
            raise PydanticCustomError("edited_plan", "{problem}", {"problem": problem})
        return self

    def _inconsistency(self) -> str | None:
        by_key: dict[str, BuildStep] = {}
        for step in (*self.steps, *self.baseline_steps):
            if step.key is not None and by_key.setdefault(step.key, step) is not step:
                return f"{step.label}: another step has its key"
        for step in by_key.values():
            for stage, key in _reads(step):
                found = by_key.get(key)
                if found is None or found.stage != stage or found.variant != step.variant:
                    return f"{step.label}: it reads a {stage} step of {step.variant} that the plan does not have"
        for tag in (*self.tags, *self.references, *self.baselines):
            if tag.key is None:
                continue
            made = by_key.get(tag.key)
            if made is None or (made.stage, made.variant, made.quant) != (tag.stage, tag.variant, tag.quant):
                return f"{tag.tag}: no {tag.stage} step of {tag.variant} ({tag.quant}) has its key"
            convert = by_key.get(made.convert or "") if isinstance(made, PlannedQuantize) else made
            bake_key = convert.bake if isinstance(convert, PlannedConvert) else None
            if (tag.identity, tag.imatrix_key) != (_identity(made, bake_key), _matrix_key(made)):
                return f"{tag.tag}: its identity is not its step's"
        return None

    def looked_up(self, workspace: Workspace) -> BuildPlan:
        """This plan with what the workspace holds now: which steps are built, and each built GGUF's record (a
        saved plan's own say on that is not trusted)."""
        def tag(t: TagBuild) -> TagBuild:
            return t.model_copy(update={"record": _record(workspace, t.stage, t.key)})

        return self.model_copy(update={
            "steps": [s.model_copy(update={"cached": bool(s.key and workspace.lookup(s.stage, s.key))})
                      for s in self.steps],
            "tags": [tag(t) for t in self.tags], "references": [tag(t) for t in self.references],
            "baselines": [tag(t) for t in self.baselines]})

    def check(self, manifest: Manifest, inputs: BuildInputs) -> tuple[list[str], list[str]]:
        """(what is not the manifest's, what moved since): each step held against the step the manifest and the
        inputs now make of it, given the steps it reads. Steps whose key the plan did not know are not checked:
        they are made once their input is downloaded (plan --allow-unknown-keys)."""
        slots = sorted(_slot(s) for s in self.steps)
        if slots != (wanted := sorted(_slot(s) for s in _plan(manifest, inputs).steps)):
            missing, extra = set(wanted) - set(slots), set(slots) - set(wanted)
            return [f"its build steps are not the manifest's (not in the manifest: {_slot_names(extra) or '-'}; "
                    f"missing: {_slot_names(missing) or '-'})"], []
        misfits: list[str] = []
        moved: list[str] = []
        for saved in self.steps:
            if saved.key is None or inputs.model_digest is None:
                continue
            expected = _expected(saved, manifest, inputs, self)
            differ = {k for k, v in saved.content().items() if expected.content().get(k) != v}
            if isinstance(saved, PlannedConvert) and isinstance(expected, PlannedConvert) and "metadata" in differ:
                differ.discard("metadata")
                old, new = saved.metadata or {}, expected.metadata or {}
                differ |= {f"metadata:{k}" for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            fits = {k for k in differ if k not in _INPUT_FIELDS and k.removeprefix("metadata:") not in _INPUT_METADATA}
            if fits:
                misfits.append(f"{saved.label}: not the manifest's ({', '.join(sorted(fits))})")
            elif differ:
                moved.append(f"the inputs of {saved.label} ({', '.join(sorted(differ))})")
        return misfits, moved


def _reads(step: BuildStep) -> list[tuple[str, str]]:
    """(stage, key) of every artifact `step` reads."""
    if isinstance(step, PlannedConvert):
        found = [("bake", step.bake)]
    elif isinstance(step, PlannedImatrix):
        found = [("convert", step.convert)]
    elif isinstance(step, PlannedQuantize):
        found = [("convert", step.convert), ("imatrix", step.imatrix)]
    else:
        found = []
    return [(stage, key) for stage, key in found if key is not None]


def _matrix_key(step: BuildStep) -> str | None:
    return step.imatrix if isinstance(step, PlannedQuantize) else None


def _identity(step: BuildStep, bake_key: str | None) -> dict[str, str] | None:
    """What a host's copy of the GGUF that `step` writes must report (IDENTITY_KEYS); None while unknown."""
    if not isinstance(step, PlannedConvert | PlannedQuantize) or None in (step.key, bake_key, step.quant):
        return None
    assert bake_key is not None and step.quant is not None
    values = (bake_key, step.llama, str(lookup_quant_type(step.quant).ftype))
    matrix = _matrix_key(step)
    return dict(zip(IDENTITY_KEYS, values, strict=True)) | ({IMATRIX_KEY: matrix} if matrix else {})


def _slot(step: BuildStep) -> tuple[str, str, str]:
    return step.stage, step.variant, step.quant or ""


def _slot_names(slots: set[tuple[str, str, str]]) -> str:
    names = sorted(f"{stage} {variant}" + (f" {quant}" if quant else "") for stage, variant, quant in slots)
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _expected(saved: BuildStep, manifest: Manifest, inputs: BuildInputs, plan: BuildPlan) -> BuildStep:
    """The step the manifest and the inputs make in `saved`'s place, reading what `saved` reads."""
    if isinstance(saved, PlannedBake):
        return bake_step(manifest, inputs, saved.variant)
    if isinstance(saved, PlannedConvert):
        return convert_step(manifest, inputs, plan.step(saved.bake, PlannedBake))
    convert = plan.step(saved.convert, PlannedConvert)
    if isinstance(saved, PlannedImatrix):
        matrix = imatrix_step(manifest, inputs.calibration, convert)
        assert matrix is not None  # the slots matched: the manifest has an importance matrix
        return matrix
    assert saved.quant is not None
    return quantize_step(manifest, convert, saved.quant,
                         plan.step(saved.imatrix, PlannedImatrix) if saved.imatrix else None)


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


def _split(size: int | None) -> dict[str, int]:
    """The split size as a key field, only when set: the keys of unsplit builds stay what they were."""
    return {} if size is None else {"split_max_size": size}


def bake_step(manifest: Manifest, inputs: BuildInputs, variant: str) -> PlannedBake:
    return _keyed(PlannedBake, inputs.model_digest is not None, variant=variant, tool=__version__,
                  model=inputs.model_digest, adapters=inputs.adapter_records,
                  scales=manifest.bake.variants[variant].as_dict(), dtype=manifest.bake.dtype,
                  note=inputs.note if inputs.model_digest is None else "")


def convert_step(manifest: Manifest, inputs: BuildInputs, bake: PlannedBake) -> PlannedConvert:
    metadata = None if bake.key is None else gguf_metadata(
        source=inputs.source_label, adapters=inputs.adapter_digests, scales=bake.scales, variant=bake.variant,
        manifest_name=manifest.name, bake_key=bake.key)
    return _keyed(PlannedConvert, bake.key is not None, variant=bake.variant,
                  quant=convert_outtype(manifest.quantize.types), bake=bake.key, llama=llama_cpp_label(),
                  metadata=metadata, split_max_size=manifest.quantize.split_max_size, note=bake.note)


def imatrix_step(manifest: Manifest, calibration: Calibration | None,
                 convert: PlannedConvert) -> PlannedImatrix | None:
    """The variant's importance matrix: its float GGUF, the calibration text as used, the settings; None when the
    manifest has none."""
    imatrix = manifest.quantize.imatrix
    if imatrix is None:
        return None
    return _keyed(PlannedImatrix, calibration is not None and convert.key is not None, variant=convert.variant,
                  convert=convert.key, calibration=calibration.digest if calibration else None,
                  dataset=calibration.dataset if calibration else None,
                  parse_special=calibration.parse_special if calibration else None, ctx=imatrix.ctx,
                  chunks=imatrix.chunks, llama=llama_cpp_label(), note=convert.note)


def quantize_step(manifest: Manifest, convert: PlannedConvert, quant: str,
                  matrix: PlannedImatrix | None) -> PlannedQuantize:
    known = convert.key is not None and (matrix is None or matrix.key is not None)
    return _keyed(PlannedQuantize, known, variant=convert.variant, quant=quant, convert=convert.key,
                  imatrix=matrix.key if matrix else None, llama=llama_cpp_label(),
                  split_max_size=manifest.quantize.split_max_size, note=convert.note)


def plan_builds(manifest: Manifest, inputs: BuildInputs, workspace: Workspace) -> BuildPlan:
    """The steps the manifest needs on these inputs, with what the workspace already holds."""
    return _plan(manifest, inputs).looked_up(workspace)


def _plan(manifest: Manifest, inputs: BuildInputs) -> BuildPlan:
    steps: list[BuildStep] = []
    tags: list[TagBuild] = []
    references: list[TagBuild] = []
    baselines: list[TagBuild] = []
    baseline_steps: list[PlannedQuantize] = []
    for variant in manifest.bake.variants:
        bake = bake_step(manifest, inputs, variant)
        convert = convert_step(manifest, inputs, bake)
        matrix = imatrix_step(manifest, inputs.calibration, convert)
        steps += [bake, convert]
        converted = _tag_build(manifest, convert, bake.key)
        references.append(converted)
        if matrix is not None and any(uses_imatrix(manifest, quant) for quant in manifest.quantize.types):
            steps.append(matrix)
        for quant in manifest.quantize.types:
            if quant == convert.quant:
                tags.append(converted)
                continue
            with_matrix = uses_imatrix(manifest, quant)
            step = quantize_step(manifest, convert, quant, matrix if with_matrix else None)
            steps.append(step)
            tags.append(_tag_build(manifest, step, bake.key))
            if with_matrix and not lookup_quant_type(quant).needs_imatrix:
                plain = quantize_step(manifest, convert, quant, None)
                baseline_steps.append(plain)
                baselines.append(_tag_build(manifest, plain, bake.key))
    return BuildPlan(steps=steps, tags=tags, references=references, baselines=baselines,
                     baseline_steps=baseline_steps)


def uses_imatrix(manifest: Manifest, quant: str) -> bool:
    """Whether the manifest's importance matrix goes into this level: every quantized one, not a float copy."""
    return manifest.quantize.imatrix is not None and not lookup_quant_type(quant).is_float


def _tag_build(manifest: Manifest, step: PlannedConvert | PlannedQuantize, bake_key: str | None) -> TagBuild:
    assert step.quant is not None
    return TagBuild(tag=manifest.tag(step.variant, step.quant), variant=step.variant, quant=step.quant,
                    stage=step.stage, key=step.key, file_name=f"{manifest.name}-{step.variant}-{step.quant}.gguf",
                    identity=_identity(step, bake_key), imatrix_key=_matrix_key(step))
