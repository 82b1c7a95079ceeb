"""The typer application objects and the options several commands share; commands register on these."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import SettingError, UsageError

if TYPE_CHECKING:
    from ..manifest.schema import Manifest

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

# step: what an unexpected error names; redact: what the error boundary passes every line through.
state: dict[str, Any] = {"verbose": False, "manifest": None, "step": None, "redact": None}

DEFAULT_CACHE = Path(".so8t/cache")
ManifestArg = Annotated[Path, typer.Argument(help="Path to the manifest YAML.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
VerifyCacheOpt = Annotated[bool, typer.Option("--verify-cache", help="Hash every cached GGUF against its "
                                              "recorded sha256 before trusting it (a size-and-mtime check is "
                                              "always done); a damaged artifact is rebuilt.")]
CacheOpt = Annotated[Path, typer.Option("--cache-dir", help="The workspace: artifacts, digests, host journals, "
                                        "releases, hub downloads, the converter.")]


@contextlib.contextmanager
def flags(**names: str) -> Iterator[None]:
    """A setting the library refuses, named by the flag this command took it from: flags(dtype="--dtype")."""
    try:
        yield
    except SettingError as e:
        if e.setting not in names:
            raise
        raise UsageError(f"{names[e.setting]}: {e.why}") from None


def load(path: Path) -> Manifest:
    """Load the manifest a command works on; from here on, every error line names it."""
    from ..manifest.loader import load_manifest
    from ..manifest.secrets import Redactor

    state["manifest"] = path
    manifest = load_manifest(path)
    state["redact"] = Redactor.for_manifest(manifest)  # an unexpected error may quote a header value
    return manifest
