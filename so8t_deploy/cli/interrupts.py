"""Ctrl-C and SIGTERM during a rollout: ask the run to stop at the next safe point."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from ..cancel import CancelToken


@contextmanager
def interrupts_ask(cancel: CancelToken) -> Iterator[None]:
    """Inside a cooperative section: finish the step in flight, roll back, exit 130; twice: stop now."""

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
