"""Importance matrices from the pinned llama.cpp, without building its llama-imatrix tool.

The computation runs in a child process (imatrix_runner), as the quantizer does: Ctrl-C ends it inside
llama_decode, and a crash in the library cannot take the build with it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import BuildError, UsageError
from ..fsutil import publish_file, staging_path
from .child import last_lines, progress_of, run_child
from .imatrix import ImatrixInfo, read_imatrix_info
from .imatrix_runner import MIN_ROWS, REASON_PREFIX, USAGE_EXIT
from .llama_log import LOGGER
from .llamacpp import library_version

_WHAT = "quantize.imatrix"  # the manifest setting these inputs come from, named in usage errors
PROGRESS_EVERY_S = 10.0


def chunk_progress(say: Callable[[str], None], label: str) -> Callable[[int, int], None]:
    """An on_progress for compute_imatrix that says lines, not a bar, so a log or a container's output shows
    them too: on the first and last chunk, and every PROGRESS_EVERY_S between, the chunks done, the time so far
    and the estimate for the rest."""
    started, last = time.monotonic(), [-PROGRESS_EVERY_S]

    def report(done: int, total: int) -> None:
        elapsed = time.monotonic() - started
        if done in (1, total) or elapsed - last[0] >= PROGRESS_EVERY_S:
            last[0] = elapsed
            left = elapsed / done * (total - done)
            say(f"{label}: chunk {done}/{total}, {elapsed:.0f} s elapsed, about {left:.0f} s left")

    return report


def compute_imatrix(gguf: Path, text_file: Path, out_file: Path, *, dataset: str, ctx: int,
                    chunks: int | None = None, parse_special: bool = False, threads: int | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> ImatrixInfo:
    """llama-imatrix's importance matrix of `gguf` over `text_file`, in chunks of `ctx` tokens (all the text
    holds, or the first `chunks`); out_file appears only complete.

    `dataset` is what the file records as its calibration text. `on_progress(chunks done, chunks)` follows
    each chunk. Too little text for two chunks is a UsageError.
    """
    _check_inputs(gguf, text_file, ctx, chunks)
    library_version()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out_file)
    command = [sys.executable, "-m", "so8t_deploy.external.imatrix_runner", str(gguf), str(text_file), str(staging),
               "--ctx", str(ctx), "--dataset", dataset, "--threads", str(threads or os.cpu_count() or 1)]
    command += ["--chunks", str(chunks)] if chunks is not None else []
    command += ["--parse-special"] if parse_special else []
    reasons: list[str] = []

    def follow(line: str) -> None:
        if (progress := progress_of(line)) is not None:
            if on_progress:
                on_progress(*progress)
        elif line.startswith(REASON_PREFIX):
            reasons.append(line[len(REASON_PREFIX):].strip())
        elif line.strip():
            LOGGER.debug(line)

    try:
        # TMPDIR: whatever the child spools lives beside its output, in the step's staging directory
        rc, log = run_child(command, follow, env={"TMPDIR": str(out_file.parent)})
        if rc == USAGE_EXIT and reasons:
            raise UsageError(f"{_WHAT}: {reasons[-1]}")
        if rc != 0 or not staging.is_file():
            raise BuildError(f"{gguf}: importance matrix failed (exit {rc}): {last_lines(log)}")
        publish_file(staging, out_file)
    finally:
        staging.unlink(missing_ok=True)
    return read_imatrix_info(out_file)


def _check_inputs(gguf: Path, text_file: Path, ctx: int, chunks: int | None) -> None:
    """Refuse here, before a child starts, what the child would refuse."""
    if ctx < MIN_ROWS:
        raise UsageError(f"{_WHAT}: ctx {ctx} is under {MIN_ROWS}: llama.cpp collects nothing from so few rows")
    if chunks is not None and chunks < 1:
        raise UsageError(f"{_WHAT}: chunks {chunks}: must be at least 1")
    if not text_file.is_file():
        raise UsageError(f"{_WHAT}: {text_file}: no such calibration text")
    if not gguf.is_file():
        raise UsageError(f"{_WHAT}: {gguf}: no such model file")

