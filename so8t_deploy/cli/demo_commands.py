"""The offline demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .typer_app import demo_app


@demo_app.command("init")
def demo_init(directory: Annotated[Path, typer.Argument(help="New directory to write the demo into.")]) -> None:
    """Write a tiny Phi-3 model, a random SO8T adapter and a manifest, with no downloads."""
    from ..demo import init_demo

    out = init_demo(directory)
    typer.echo(f"demo written to {out}; try: so8t-deploy plan {out / 'manifest.yaml'} --offline")
