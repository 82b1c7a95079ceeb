"""The worker container's entry point: `so8t-deploy worker run SPEC` (see build/steps.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .typer_app import worker_app


@worker_app.command("run")
def worker_run(spec: Annotated[Path, typer.Argument(help="A step envelope written by the docker runner.")]) -> None:
    """Run one build step and write its result where the spec says."""
    from ..build.worker import run_envelope
    from .console import ConsoleProgress

    with ConsoleProgress() as progress:
        run_envelope(spec, progress)
