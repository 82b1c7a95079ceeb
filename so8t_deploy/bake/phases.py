"""Where a bake's time goes: per phase, the CPU time of the threads that ran it, and their wall time.

Phases run on several threads at once (a read-ahead thread hashes and checks, fold threads fold,
the main thread copies into the write buffers, a writer thread hands them to the disk), so the wall
times add up to more than the bake's; CPU time is what each phase really cost. The two differ where
a thread waits: for a free write buffer, for the disk, for an fsync, for a core.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("read", "hash", "check", "fold", "cast", "write", "disk", "fsync")


class PhaseTimes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.wall = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            with self._lock:
                self.cpu[name] += cpu
                self.wall[name] += wall

    def as_dict(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {name: {"cpu_s": self.cpu[name], "wall_s": self.wall[name]} for name in PHASES}
