"""llama.cpp's own log, routed instead of printed.

The library prints warnings on every model load (`n_ctx_train (0)` on small models) and a line per
tensor while quantizing. Everything it says goes to the `so8t_deploy.llama_cpp` logger, which the
CLI shows only with -v, and to whoever is watching a quantization's progress.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOGGER = logging.getLogger("so8t_deploy.llama_cpp")
TENSOR_LINE = re.compile(r"^\s*\[\s*(\d+)/\s*(\d+)\]")  # llama_model_quantize: "[  12/ 195] name - ..."

_watchers: list[Callable[[str], None]] = []
_callback: object = None  # kept alive: llama.cpp holds a raw pointer to it


def route_llama_log() -> None:
    """Install the router once, after llama_cpp's own import installed its printing callback."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace")
        for watch in list(_watchers):
            watch(message)
        if message.strip():
            LOGGER.debug(message.rstrip("\n"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _callback = callback


@contextmanager
def watching(watch: Callable[[str], None]) -> Iterator[None]:
    """Call `watch` with every log message llama.cpp writes while the block runs."""
    route_llama_log()
    _watchers.append(watch)
    try:
        yield
    finally:
        _watchers.remove(watch)


def tensor_progress(on_progress: Callable[[int, int], None]) -> Callable[[str], None]:
    """A watcher that turns a quantization's per-tensor lines into on_progress(done, total)."""

    def watch(message: str) -> None:
        if match := TENSOR_LINE.match(message):
            on_progress(int(match[1]), int(match[2]))

    return watch
