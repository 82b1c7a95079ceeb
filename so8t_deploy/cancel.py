"""Cooperative cancellation: Ctrl-C and SIGTERM ask a rollout to stop at the next safe point.

Inside a `cooperative()` section the CLI's signal handler only calls `cancel()`, and the domain
calls `check()` between steps: a step in flight (a create, a smoke generation) is finished,
never cut in half, and what the run changed is undone before it exits 130. Outside such a
section (a build, say) an interrupt stops the work at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Interrupted


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._depth = 0

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def cooperative_now(self) -> bool:
        """True while code that checks this token runs: an interrupt should ask, not raise."""
        return self._depth > 0

    @contextmanager
    def cooperative(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def check(self) -> None:
        if self._event.is_set():
            raise Interrupted("interrupted")


def leave_interrupts_to_the_main_thread() -> None:
    """Run first in every worker thread we start.

    The kernel hands a process-wide signal to any thread that does not block it. Taken by a worker,
    Ctrl-C would only set a flag while the main thread sleeps on a lock or a pipe, and the interrupt
    would wait for that to end; blocked here, it always wakes the main thread, which handles it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
