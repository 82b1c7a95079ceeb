"""The `so8t-deploy` command line: thin commands over library calls, one error boundary.

Exit codes: 0 ok, 1 operational failure, 2 invalid input (see README).
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_OPERATIONAL, So8tError

if TYPE_CHECKING:
    from .cancel import CancelToken

app = typer.Typer(
    name="so8t-deploy",
    help="Bake SO8T/LoRA adapters exactly, build GGUF quant ladders, and roll them out to Ollama.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
demo_app = typer.Typer(help="A self-contained offline demo.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
image_app = typer.Typer(help="The worker image for runtime.backend: docker.", no_args_is_help=True)
app.add_typer(image_app, name="image")
worker_app = typer.Typer(help="Steps run inside the worker container (its entry point).", no_args_is_help=True,
                         hidden=True)
app.add_typer(worker_app, name="worker")

_state = {"verbose": False}

ManifestArg = Annotated[Path, typer.Argument(help="Path to the manifest YAML.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    _state["verbose"] = verbose


@app.command()
def validate(manifest: ManifestArg) -> None:
    """Check a manifest against the schema; exit 2 with one line naming the field if it fails."""
    from .manifest_loader import load_manifest

    load_manifest(manifest)
    typer.echo(f"{manifest}: ok")


@app.command()
def schema() -> None:
    """Print the manifest's JSON Schema."""
    from .console import print_json
    from .manifest import Manifest

    print_json(Manifest.model_json_schema(by_alias=True))


CacheOpt = Annotated[Path, typer.Option("--cache-dir", help="Content-addressed artifact cache.")]
DEFAULT_CACHE = Path(".so8t/cache")


@app.command()
def plan(
    manifest: ManifestArg,
    offline: Annotated[bool, typer.Option("--offline", help="Only list variants, tags and artifacts.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Exit 3 when any host differs from the manifest.")] = False,
    cache_dir: CacheOpt = DEFAULT_CACHE,
    as_json: JsonOpt = False,
) -> None:
    """Show what apply would do on each host (upload, create, unchanged, backup, delete); changes nothing."""
    from .console import print_build_plan, print_host_plans
    from .errors import DriftError
    from .manifest_loader import load_manifest

    loaded = load_manifest(manifest)
    if offline:
        from .plan import plan_builds

        print_build_plan(plan_builds(loaded), as_json=as_json)
        return
    from .deploy import plan_online

    plans = plan_online(loaded, cache_dir)
    print_host_plans(plans, as_json=as_json)
    drifted = [p.target for p in plans if p.drift]
    if check and drifted:
        raise DriftError(f"{manifest}: drift on {', '.join(drifted)}")


@app.command()
def apply(
    manifest: ManifestArg,
    cache_dir: CacheOpt = DEFAULT_CACHE,
    force: Annotated[bool, typer.Option("--force", help="Roll out tags that fail the quality gate.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build, register, smoke-test and roll out every tag: canary first, all or nothing per host, prune."""
    from .cancel import CancelToken
    from .console import ConsoleProgress, print_apply_result
    from .deploy import apply_manifest
    from .errors import Interrupted, RolloutError
    from .manifest_loader import load_manifest

    loaded, cancel = load_manifest(manifest), CancelToken()
    with _interrupts_ask(cancel), ConsoleProgress() as progress:
        result = apply_manifest(loaded, cache_dir, progress, force=force, cancel=cancel)
    print_apply_result(result, as_json=as_json)
    states = "; ".join(f"{h.target}: {h.status} ({h.outcome})" for h in result.hosts)
    if cancel.cancelled:
        raise Interrupted(f"apply: interrupted; {states}")
    if result.failed:
        raise RolloutError(f"apply: {len(result.failed)} of {len(result.hosts)} hosts failed: "
                           + "; ".join(f"{h.target}: {h.status}, {h.outcome} ({h.error})" for h in result.failed))
    if result.gated:
        raise RolloutError(f"apply: the quality gate held back {', '.join(result.gated)} "
                           "(see `so8t-deploy eval`; --force rolls them out anyway)")


@contextmanager
def _interrupts_ask(cancel: CancelToken) -> Iterator[None]:
    """Ctrl-C / SIGTERM during a rollout: finish the step in flight, roll back, exit 130; twice: stop now."""

    def handler(signum: int, frame: object) -> None:
        if cancel.cancelled or not cancel.cooperative_now:
            raise KeyboardInterrupt
        cancel.cancel()
        typer.echo("interrupted: finishing the step in flight, then rolling back (interrupt again to stop at once)",
                   err=True)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@app.command()
def smoke(manifest: ManifestArg, as_json: JsonOpt = False) -> None:
    """Run the manifest's smoke tests against every tag on every host."""
    from .console import print_smoke_results
    from .deploy import smoke_manifest
    from .errors import SmokeTestError
    from .manifest_loader import load_manifest

    results = smoke_manifest(load_manifest(manifest))
    print_smoke_results(results, as_json=as_json)
    failed = [r for r in results if not r.passed]
    if failed:
        raise SmokeTestError(f"smoke: {len(failed)} of {len(results)} checks failed "
                             f"(first: {failed[0].host} {failed[0].tag}: {failed[0].reason})")


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
    from .bake.bake import bake_model
    from .console import byte_progress
    from .manifest import parse_scales

    with byte_progress("baking") as advance:
        adapters = [(None, a, allow_base_mismatch) for a in adapter]
        result = bake_model(model, adapters, out, parse_scales(scales), dtype, advance)
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
    """Prove a bake exact: compare logits of the adapter model (hooks, no folding) and the baked model."""
    from .bake.verify import verify_bake
    from .errors import VerifyError
    from .manifest import parse_scales

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
    from .convert import convert_model_dir

    converter = convert_model_dir(baked, out, outtype)
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
    from .errors import UsageError
    from .external.llamacpp import quantize_gguf
    from .quant_types import lookup_quant_type

    try:
        quant = lookup_quant_type(type_)
    except KeyError as e:
        raise UsageError(f"--type: {e.args[0]}") from None
    quantize_gguf(source, out, quant, imatrix=imatrix, allow_requantize=allow_requantize)
    typer.echo(f"{out}: {quant.name}")


@app.command()
def build(
    manifest: ManifestArg,
    cache_dir: CacheOpt = DEFAULT_CACHE,
    as_json: JsonOpt = False,
) -> None:
    """Bake, convert and quantize every variant of a manifest; reuse what is already built."""
    from .build import build as run_build
    from .console import print_build_report, step_logger
    from .manifest_loader import load_manifest
    from .runner import runner_for

    loaded = load_manifest(manifest)
    report = run_build(loaded, cache_dir, runner_for(loaded, cache_dir), log=step_logger())
    print_build_report(report, as_json=as_json)


@app.command("eval")
def eval_quality(
    manifest: ManifestArg,
    report: Annotated[Path | None, typer.Option("--report", help="Write quality.md, .json and .png here.")] = None,
    cache_dir: CacheOpt = DEFAULT_CACHE,
    as_json: JsonOpt = False,
) -> None:
    """Measure each quant level against its variant's float GGUF: KL divergence, top-1, perplexity, speed."""
    from .build import build as run_build
    from .console import print_quality, step_logger
    from .manifest_loader import load_manifest
    from .quality import evaluate
    from .quality_report import write_report
    from .runner import runner_for

    loaded = load_manifest(manifest)
    built = run_build(loaded, cache_dir, runner_for(loaded, cache_dir), log=step_logger())
    results = evaluate(loaded, built, cache_dir)
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
    from .errors import UsageError
    from .external.docker_engine import build_image
    from .manifest_loader import load_manifest

    image = tag or (load_manifest(manifest).runtime.image if manifest else "so8t-deploy-worker:latest")
    args = {}
    for item in build_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--build-arg: expected KEY=VALUE, got {item!r}")
        args[key] = value
    build_image(image, wheelhouse, args)
    typer.echo(f"built {image}")


@worker_app.command("bake")
def worker_bake(
    model: Annotated[Path, typer.Option("--model")],
    out: Annotated[Path, typer.Option("--out")],
    digests: Annotated[Path, typer.Option("--digests")],
    adapter: Annotated[list[str], typer.Option("--adapter", help="KIND:PATH")] = [],  # noqa: B006
    scales: ScalesOpt = "",
    dtype: Annotated[str, typer.Option("--dtype")] = "auto",
    allow_base_mismatch: Annotated[list[Path], typer.Option("--allow-base-mismatch", help="PATH")] = [],  # noqa: B006
) -> None:
    from .bake.bake import bake_model
    from .hashing import DigestCache
    from .manifest import parse_scales

    adapters = [(kind, Path(path), Path(path) in allow_base_mismatch)
                for kind, _, path in (a.partition(":") for a in adapter)]
    bake_model(model, adapters, out, parse_scales(scales), dtype, digests=DigestCache(digests))


@worker_app.command("convert")
def worker_convert(
    baked: Annotated[Path, typer.Argument()],
    out: Annotated[Path, typer.Option("--out")],
    outtype: Annotated[str, typer.Option("--outtype")],
    metadata_json: Annotated[str, typer.Option("--metadata-json")] = "{}",
) -> None:
    import json

    from .external.llamacpp import convert_to_gguf, locate_converter

    convert_to_gguf(locate_converter(), baked, out, outtype, json.loads(metadata_json))


@worker_app.command("quantize")
def worker_quantize(
    source: Annotated[Path, typer.Argument()],
    out: Annotated[Path, typer.Option("--out")],
    type_: Annotated[str, typer.Option("--type")],
) -> None:
    from .external.llamacpp import quantize_gguf
    from .quant_types import lookup_quant_type

    quantize_gguf(source, out, lookup_quant_type(type_))


@worker_app.command("version")
def worker_version() -> None:
    from .runner import LocalRunner

    typer.echo(LocalRunner().llama_cpp_version())


@demo_app.command("init")
def demo_init(directory: Annotated[Path, typer.Argument(help="New directory to write the demo into.")]) -> None:
    """Write a tiny Phi-3 model, a random SO8T adapter and a manifest, with no downloads."""
    from .demo import init_demo

    out = init_demo(directory)
    typer.echo(f"demo written to {out}; try: so8t-deploy plan {out / 'manifest.yaml'} --offline")


def main(argv: list[str] | None = None) -> int:
    """Entry point and the single error boundary."""
    command = typer.main.get_command(app)
    try:
        # Standalone mode lets typer report usage errors (exit 2) and turn Ctrl-C into exit 130.
        command.main(args=argv, prog_name="so8t-deploy", standalone_mode=True)
    except So8tError as e:
        if _state["verbose"]:
            traceback.print_exc()
        typer.echo(str(e).splitlines()[0] if str(e) else type(e).__name__, err=True)
        return e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_OPERATIONAL
        if code == EXIT_INTERRUPTED:
            typer.echo("interrupted", err=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
