"""The `so8t-deploy` command line: thin commands over library calls, and the one error boundary.

Exit codes: 0 ok, 1 operational failure, 2 invalid input, 3 drift (plan --check; apply when a host
or an input changed since the plan), 130 interrupted. See README.
"""

from __future__ import annotations

import traceback
from typing import Annotated

import typer

from .. import __version__
from ..errors import EXIT_INTERRUPTED, EXIT_OPERATIONAL, So8tError
from . import build_commands, demo_commands, deploy_commands, worker_commands  # noqa: F401 - they register
from .typer_app import app, state


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    state["verbose"] = verbose


def main(argv: list[str] | None = None) -> int:
    """Entry point and the single error boundary."""
    command = typer.main.get_command(app)
    try:
        # Standalone mode lets typer report usage errors (exit 2) and turn Ctrl-C into exit 130.
        command.main(args=argv, prog_name="so8t-deploy", standalone_mode=True)
    except So8tError as e:
        if state["verbose"]:
            traceback.print_exc()
        typer.echo(str(e).splitlines()[0] if str(e) else type(e).__name__, err=True)
        return e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_OPERATIONAL
        if code == EXIT_INTERRUPTED:
            typer.echo("interrupted", err=True)
        return code
    return 0
