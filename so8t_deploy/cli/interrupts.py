"""Ctrl-C and SIGTERM: stop a command at once, or, during a rollout, at the next safe point."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer

from ..cancel import CancelToken

Handler = Callable[[int, object], None]


@contextmanager
def interrupts_handled_by(handler: Handler) -> Iterator[None]:
    """`handler` takes SIGINT and SIGTERM inside the block; the previous handlers come back after it.

    Installed explicitly, SIGINT included: Python leaves SIGINT ignored when it starts ignored, as
    it does for a job that a shell script puts in the background, and a cancelled CI job must still stop.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_now(signum: int, frame: object) -> None:
    """Every command's default: unwind (each step discards what it had begun), then exit 130."""
    raise KeyboardInterrupt


@contextmanager
def interrupts_ask(cancel: CancelToken) -> Iterator[None]:
    """Inside a cooperative section: finish the step in flight, roll back, exit 130; twice: stop now."""

    def handler(signum: int, frame: object) -> None:
        if cancel.cancelled or not cancel.cooperative_now:
            raise KeyboardInterrupt
        cancel.cancel()
        typer.echo("interrupted: finishing the step in flight, then rolling back (interrupt again to stop at once)",
                   err=True)

    with interrupts_handled_by(handler):
        yield
