"""The build commands: bake, verify, convert, quantize, build, eval, and the worker image."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from ..errors import UsageError, VerifyError
from .typer_app import DEFAULT_CACHE, CacheOpt, JsonOpt, ManifestArg, VerifyCacheOpt, app, flags, image_app, load

if TYPE_CHECKING:
    from ..manifest.schema import Scales

AdapterOpt = Annotated[
    list[Path], typer.Option("--adapter", help="Adapter directory (SO8T or PEFT LoRA); repeat to chain, in order.")
]
AllowMismatchOpt = Annotated[
    bool, typer.Option("--allow-base-mismatch",
                       help="Accept adapters whose recorded base model names another model (a renamed local copy).")
]
ScalesOpt = Annotated[
    str, typer.Option("--scales", help="Bake scales, e.g. rotation=0.1,ffn=0.05,triality=0.02 (default 1.0).")
]


def parse_scales(text: str) -> Scales:
    """--scales 'rotation=0.1,ffn=0.05'; groups left out stay at 1.0."""
    from ..manifest.schema import Scales

    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--scales: expected group=value, got {item!r}")
        values[key.strip()] = value.strip()
    try:
        return Scales.model_validate(values)
    except ValidationError as e:
        error = e.errors()[0]
        message = "unknown group (use rotation, ffn, triality)" if error["type"] == "extra_forbidden" else error["msg"]
        raise UsageError(f"--scales: {error['loc'][0]}: {message}") from None


@app.command()
def bake(
    model: Annotated[Path, typer.Option("--model", help="Base model directory (safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the baked model.")],
    adapter: AdapterOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    scales: ScalesOpt = "",
    dtype: Annotated[str, typer.Option("--dtype", help="auto | bfloat16 | float16 | float32")] = "auto",
    allow_base_mismatch: AllowMismatchOpt = False,
) -> None:
    """Fold adapters into the base weights exactly; write a plain Hugging Face model."""
    from ..bake.bake import bake_model
    from .console import ConsoleProgress

    adapters = [(None, a, allow_base_mismatch) for a in adapter]
    total = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    with ConsoleProgress() as progress, flags(dtype="--dtype"):
        result = bake_model(model, adapters, out, parse_scales(scales), dtype=dtype,
                            on_progress=progress.transfer("bake", total))
    typer.echo(f"{result.out_dir}: {result.folded} tensors folded, {result.copied} copied unchanged")


@app.command()
def verify(
    model: Annotated[Path, typer.Option("--model", help="Base model directory.")],
    baked: Annotated[Path, typer.Option("--baked", help="Baked model directory to check.")],
    adapter: AdapterOpt = [],  # noqa: B006
    scales: ScalesOpt = "",
    tolerance: Annotated[
        float | None, typer.Option("--tolerance", help="Max |Δlogit|; default by dtype (fp32 1e-4).")
    ] = None,
    allow_base_mismatch: AllowMismatchOpt = False,
) -> None:
    """Prove a bake exact: compare logits of the adapter model (unmerged, no folding) and the baked model."""
    from ..bake.verify import verify_bake

    adapters = [(None, a, allow_base_mismatch) for a in adapter]
    report = verify_bake(model, adapters, baked, parse_scales(scales), tolerance)
    typer.echo(
        f"max |Δlogit| {report.max_abs_diff:.3e} (tolerance {report.tolerance:.1e}, baked {report.baked_dtype}); "
        f"adapter effect max |adapter - base| {report.adapter_effect:.3e}"
    )
    if not report.passed:
        raise VerifyError(f"{baked}: not equivalent: max |Δlogit| {report.max_abs_diff:.3e} > {report.tolerance:.1e}")


@app.command()
def convert(
    baked: Annotated[Path, typer.Argument(help="Hugging Face model directory (e.g. a bake output).")],
    out: Annotated[Path, typer.Option("--out", help="GGUF file to write.")],
    outtype: Annotated[str, typer.Option("--outtype", help="f32 | f16 | bf16 | q8_0")] = "f16",
) -> None:
    """Convert a model directory to GGUF with llama.cpp's own converter (pinned)."""
    from ..build.provenance import bake_output_metadata
    from ..external.llamacpp import convert_to_gguf, locate_converter

    converter = locate_converter()
    with flags(outtype="--outtype"):
        convert_to_gguf(converter, baked, out, outtype, metadata=bake_output_metadata(baked))
    typer.echo(f"{out}: written by {converter.version}")


@app.command()
def quantize(
    source: Annotated[Path, typer.Argument(help="GGUF file to quantize (f32, f16 or bf16).")],
    out: Annotated[Path, typer.Option("--out", help="GGUF file to write.")],
    type_: Annotated[str, typer.Option("--type", help="llama.cpp type, e.g. q4_k_m (case-insensitive).")],
    imatrix: Annotated[Path | None, typer.Option("--imatrix", help="Importance matrix (for IQ1/IQ2, Q2_K_S).")] = None,
    allow_requantize: Annotated[
        bool, typer.Option("--allow-requantize", help="Quantize an already quantized file anyway.")
    ] = False,
) -> None:
    """Quantize a GGUF with llama.cpp's quantizer (every llama.cpp type)."""
    from ..external.llamacpp import quantize_gguf
    from ..manifest.quant_types import lookup_quant_type

    try:
        quant = lookup_quant_type(type_)
    except KeyError as e:
        raise UsageError(f"--type: {e.args[0]}") from None
    metadata: dict[str, str | int] = {}
    if imatrix is not None:  # what llama-quantize --imatrix records
        from ..build.provenance import quantize_imatrix_keys
        from ..external.imatrix import read_imatrix_info

        info = read_imatrix_info(imatrix)
        metadata = quantize_imatrix_keys(file=str(imatrix), datasets=info.datasets, entries=info.entries,
                                         chunks=info.chunks)
    with flags(imatrix="--imatrix", allow_requantize="--allow-requantize"):
        quantize_gguf(source, out, quant, imatrix=imatrix, metadata=metadata, allow_requantize=allow_requantize)
    typer.echo(f"{out}: {quant.name}")


@app.command()
def imatrix(
    source: Annotated[Path, typer.Argument(help="Float GGUF (f32, f16 or bf16) to compute it from.")],
    text: Annotated[Path, typer.Option("--text", help="Calibration text (plain text).")],
    out: Annotated[Path, typer.Option("--out", help="Importance matrix GGUF to write (for quantize --imatrix).")],
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per chunk.")] = 512,
    chunks: Annotated[int | None, typer.Option("--chunks", help="Use at most this many chunks (default: all).")] = None,
) -> None:
    """Compute llama.cpp's importance matrix of a GGUF on calibration text (llama-imatrix's statistics)."""
    from ..external.imatrix_compute import chunk_progress, compute_imatrix

    report = chunk_progress(lambda line: typer.echo(line, err=True), f"imatrix {source.name} <- {text.name}")
    info = compute_imatrix(source, text, out, dataset=text.name, ctx=ctx, chunks=chunks, on_progress=report)
    typer.echo(f"{out}: {info.entries} entries from {info.chunks} chunks of {info.chunk_size} tokens")


@app.command()
def build(
    manifest: ManifestArg,
    cache_dir: CacheOpt = DEFAULT_CACHE,
    verify_cache: VerifyCacheOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Bake, convert and quantize every variant of a manifest; reuse what is already built."""
    from ..deploy.commands import build_manifest
    from ..store.workspace import Workspace
    from .console import ConsoleProgress, print_build_report

    with ConsoleProgress() as progress:
        report = build_manifest(load(manifest), Workspace(cache_dir), progress, manifest_path=manifest,
                                verify_cache=verify_cache)
    print_build_report(report, as_json=as_json)


@app.command("eval")
def eval_quality(
    manifest: ManifestArg,
    report: Annotated[Path | None, typer.Option("--report", help="Write quality.md, .json and .png here.")] = None,
    cache_dir: CacheOpt = DEFAULT_CACHE,
    as_json: JsonOpt = False,
) -> None:
    """Measure each quant level against its variant's float GGUF: KL divergence, top-1, perplexity, speed."""
    from ..deploy.commands import eval_manifest
    from ..quality.report import write_report
    from ..store.workspace import Workspace
    from .console import ConsoleProgress, print_quality

    loaded = load(manifest)
    with ConsoleProgress() as progress:
        results = eval_manifest(loaded, Workspace(cache_dir), progress, manifest_path=manifest)
    print_quality(results, loaded, as_json=as_json)
    if report is not None:
        paths = write_report(results, report, loaded.name)
        typer.echo(f"report: {', '.join(str(p) for p in paths)}", err=True)


@image_app.command("build")
def image_build(
    manifest: Annotated[Path | None, typer.Argument(help="Take the image tag from runtime.image.")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Image tag (default: the manifest's runtime.image).")] = None,
    wheelhouse: Annotated[Path, typer.Option("--wheelhouse", help="Wheels for the image (make wheelhouse).")] = Path(
        ".cache/wheelhouse"),
    build_arg: Annotated[list[str], typer.Option("--build-arg", help="KEY=VALUE for docker/Dockerfile.")] = [],  # noqa: B006
) -> None:
    """Build the worker image with the docker SDK (build args, streamed log)."""
    from ..external.docker_engine import build_image
    from .console import ConsoleProgress

    image = tag or (load(manifest).runtime.image if manifest else "so8t-deploy-worker:latest")
    args = {}
    for item in build_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--build-arg: expected KEY=VALUE, got {item!r}")
        args[key] = value
    with ConsoleProgress() as progress:
        build_image(image, wheelhouse, args, progress)
    typer.echo(f"built {image}")
