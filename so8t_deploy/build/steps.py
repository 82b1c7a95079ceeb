"""The worker contract: every heavy step as one typed, serialisable spec, and its typed result.

Both runners execute exactly these: the local runner in this process, the docker runner by
writing the spec as JSON into the workspace and running `so8t-deploy worker run SPEC` in a
container, which writes the result beside it. One definition, so the two can never disagree on
an argument. Nothing here imports the ML stack: a control machine without torch can build specs
and read results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

from ..manifest.schema import AdapterRef, Scales


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_marker(cls, record: dict[str, Any]) -> Self:
        """The result a step recorded, out of its artifact's marker (which also holds the key and file stamps)."""
        return cls.model_validate({k: v for k, v in record.items() if k in cls.model_fields})


class GgufRecord(_Model):
    """What a GGUF is: recorded in its artifact's marker and read by the control plane."""

    file: str
    size: int
    sha256: str
    bits_per_weight: float
    file_type: int | None
    architecture: str | None
    metadata: dict[str, str] = Field(default_factory=dict)  # the so8t.* provenance keys
    parts: list[str] = Field(default_factory=list)  # a split GGUF's files, `file` first; sha256 is over their digests


class BakeResult(_Model):
    folded: int
    copied: int


class ImatrixResult(_Model):
    """llama.cpp's importance matrix, as llama-quantize records it in what it quantizes."""

    file: str
    entries: int
    chunks: int
    chunk_size: int
    datasets: list[str]
    sha256: str


class QuantMetrics(_Model):
    """One quant level against its variant's float reference, on the same token windows."""

    candidate: Path
    mean_kl: float
    p99_kl: float
    top1: float
    perplexity: float
    tokens_per_second: float


class EvalResult(_Model):
    metrics: list[QuantMetrics]


R = TypeVar("R", bound=BaseModel)


class Step(_Model, Generic[R]):
    """A worker step whose result is an R (`result_model`): `Runner.run(step: Step[R]) -> R`."""

    kind: str
    result_model: ClassVar[type[BaseModel]]

    def result(self, answer: object) -> R:
        """A worker's answer as this step's result: the in-process worker's result as it is, anything else (the
        JSON read back from a container, which is trusted no more than any file) validated."""
        if type(answer) is self.result_model:
            return cast(R, answer)
        data = answer.model_dump() if isinstance(answer, BaseModel) else answer
        return cast(R, self.result_model.model_validate(data))

    def mounts(self) -> tuple[list[Path], list[Path]]:
        """(read-only inputs, read-write outputs) a container running this step needs."""
        raise NotImplementedError


class BakeStep(Step[BakeResult]):
    kind: Literal["bake"] = "bake"
    model_dir: Path
    adapters: list[AdapterRef]
    out_dir: Path
    scales: Scales
    dtype: str
    digests_file: Path  # the workspace's input digests: hashed once, shared with the control plane
    label: str = ""  # what progress calls it (the variant)
    result_model: ClassVar[type[BaseModel]] = BakeResult

    def mounts(self) -> tuple[list[Path], list[Path]]:
        return [self.model_dir, *(a.path for a in self.adapters)], [self.out_dir, self.digests_file.parent]


class ConvertStep(Step[GgufRecord]):
    kind: Literal["convert"] = "convert"
    model_dir: Path
    out_file: Path
    outtype: str
    metadata: dict[str, str]
    split_max_size: int | None = None  # larger: written as llama.cpp split files
    result_model: ClassVar[type[BaseModel]] = GgufRecord

    def mounts(self) -> tuple[list[Path], list[Path]]:
        return [self.model_dir], [self.out_file.parent]


class QuantizeStep(Step[GgufRecord]):
    kind: Literal["quantize"] = "quantize"
    in_file: Path
    out_file: Path
    quant: str
    imatrix: Path | None = None
    metadata: dict[str, str | int] = Field(default_factory=dict)  # written into the GGUF (quantize.imatrix.*, so8t.*)
    split_max_size: int | None = None
    result_model: ClassVar[type[BaseModel]] = GgufRecord

    def mounts(self) -> tuple[list[Path], list[Path]]:
        inputs = [self.in_file.parent] + ([self.imatrix.parent] if self.imatrix else [])
        return inputs, [self.out_file.parent]


class ImatrixStep(Step[ImatrixResult]):
    """llama.cpp's importance matrix of a float GGUF, computed on calibration text (llama-imatrix's statistics)."""

    kind: Literal["imatrix"] = "imatrix"
    gguf: Path
    text_file: Path
    out_file: Path
    dataset: str
    ctx: int
    chunks: int | None
    parse_special: bool
    result_model: ClassVar[type[BaseModel]] = ImatrixResult

    def mounts(self) -> tuple[list[Path], list[Path]]:
        return [self.gguf.parent, self.text_file.parent], [self.out_file.parent]


class InspectStep(Step[GgufRecord]):
    kind: Literal["inspect"] = "inspect"
    path: Path
    result_model: ClassVar[type[BaseModel]] = GgufRecord

    def mounts(self) -> tuple[list[Path], list[Path]]:
        return [self.path.parent], []


class EvalStep(Step[EvalResult]):
    kind: Literal["eval"] = "eval"
    reference: Path
    candidates: list[Path]
    text: str
    windows: int
    context: int
    result_model: ClassVar[type[BaseModel]] = EvalResult

    def mounts(self) -> tuple[list[Path], list[Path]]:
        return sorted({p.parent for p in (self.reference, *self.candidates)}), []


WorkerStep = Annotated[BakeStep | ConvertStep | ImatrixStep | QuantizeStep | InspectStep | EvalStep,
                      Field(discriminator="kind")]


class StepEnvelope(_Model):
    """What the docker runner hands the worker: the step, and where to write its result."""

    step: WorkerStep
    result_file: Path
