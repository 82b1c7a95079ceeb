"""The offline demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .typer_app import demo_app, flags


@demo_app.command("init")
def demo_init(
    directory: Annotated[Path, typer.Argument(help="New directory to write the demo into.")],
    family: Annotated[str | None, typer.Option(
        help="A real chat family's tiny model (its own tokenizer and chat template) instead of the tiny Phi-3: "
             "qwen3, gemma2, llama3.1, ...")] = None,
) -> None:
    """Write a tiny model, a random SO8T adapter and a manifest, with no downloads."""
    from ..demo import init_demo

    with flags(family="--family"):
        out = init_demo(directory, family)
    typer.echo(f"demo written to {out}; try: so8t-deploy plan {out / 'manifest.yaml'} --offline")
