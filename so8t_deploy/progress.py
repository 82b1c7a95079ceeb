"""How long-running domain code reports progress, without knowing how it is shown.

The domain (build, rollout) calls a `Progress`; only the CLI knows rich, terminals and JSON.
`SILENT` is the default for library callers and tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    def step(self, message: str) -> None:
        """A line about a step starting or a server's status ('host-a: create x: verifying conversion')."""

    def warning(self, message: str) -> None:
        """Something the operator should read, that does not stop the run."""

    def transfer(self, label: str, total: int, *, unit: str = "bytes") -> Advance | None:
        """Start a counter of `total` (bytes, or another `unit` such as "percent"); returns advance(n), or
        None when nobody watches."""


class _Silent:
    def step(self, message: str) -> None:
        pass

    def warning(self, message: str) -> None:
        pass

    def transfer(self, label: str, total: int, *, unit: str = "bytes") -> Advance | None:
        return None


SILENT: Progress = _Silent()
