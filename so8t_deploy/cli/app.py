"""The `so8t-deploy` command line: thin commands over library calls, and the one error boundary.

Exit codes: 0 ok, 1 operational failure, 2 invalid input, 3 drift (plan --check; apply when a host
or an input changed since the plan), 130 interrupted. See README.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Annotated

import typer

from .. import __version__
from ..errors import EXIT_INTERRUPTED, EXIT_OPERATIONAL, So8tError
from . import build_commands, demo_commands, deploy_commands, worker_commands  # noqa: F401 - they register
from .interrupts import interrupts_handled_by, stop_now
from .typer_app import app, state


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show tracebacks on errors, and llama.cpp's "
                                          "own log.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    state.update(verbose=verbose, step=ctx.invoked_subcommand)
    _show_library_logs(verbose)


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is when a record arrives (a test may have replaced it)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


_LOG_HANDLER = _Stderr()
_LOG_HANDLER.setFormatter(logging.Formatter("%(name)s: %(message)s"))


def _show_library_logs(verbose: bool) -> None:
    """The package's logs (llama.cpp's own messages among them) are shown with -v only."""
    logger = logging.getLogger("so8t_deploy")
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if verbose:
        logger.addHandler(_LOG_HANDLER)
    else:
        logger.removeHandler(_LOG_HANDLER)


VERBOSE_FLAGS = ("-v", "--verbose")


def _verbose_first(argv: list[str]) -> list[str]:
    """`-v` is a global option, but people type it after the command too: move it to the front."""
    rest = [arg for arg in argv if arg not in VERBOSE_FLAGS]
    return ["-v", *rest] if len(rest) != len(argv) else rest


def error_line(error: BaseException) -> str:
    """One line; it names the manifest a command worked on, unless it already starts with it.

    An error that is not one of ours (a bug, a full disk) is named by its type and the step it
    happened in, and points to -v: no traceback without it, ever.
    """
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if not isinstance(error, So8tError):
        line = f"{state['step'] or 'so8t-deploy'}: unexpected {type(error).__name__}: {line}; " \
               "run with -v for the traceback"
    manifest = state["manifest"]
    if manifest is not None and not line.startswith(str(manifest)):
        line = f"{manifest}: {line}"
    return _redacted(line)


def _redacted(text: str) -> str:
    redact = state["redact"]
    return redact(text) if redact is not None else text


def _print_traceback() -> None:
    """With -v only: the traceback, with the manifest's secrets redacted like every other line."""
    typer.echo(_redacted(traceback.format_exc()).rstrip("\n"), err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point and the single error boundary."""
    command = typer.main.get_command(app)
    state.update(verbose=False, manifest=None, step=None, redact=None)
    _show_library_logs(False)
    try:
        with interrupts_handled_by(stop_now):
            # Standalone mode lets typer report usage errors (exit 2) and turn Ctrl-C into exit 130.
            command.main(args=_verbose_first(sys.argv[1:] if argv is None else argv), prog_name="so8t-deploy",
                         standalone_mode=True)
    except So8tError as e:
        if state["verbose"]:
            _print_traceback()
        typer.echo(error_line(e), err=True)
        return e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_OPERATIONAL
        if code == EXIT_INTERRUPTED:  # every step publishes atomically: what it had begun was discarded
            typer.echo("interrupted; nothing partial was kept", err=True)
        return code
    except Exception as e:  # the last resort: a bug or the system (ENOSPC) is still one line
        if state["verbose"]:
            _print_traceback()
        typer.echo(error_line(e), err=True)
        return EXIT_OPERATIONAL
    return 0
