"""Child processes that end with us: the converter and the quantizer run in their own Python.

llama.cpp's converter is a script, and its quantizer runs inside a C call that a Python signal
handler cannot interrupt (a KeyboardInterrupt raised in a ctypes callback is swallowed). Each runs
in a child process instead: Ctrl-C reaches it with the rest of the terminal's process group, the
parent kills it on any exception of its own, and on Linux the kernel kills it when the parent dies,
even by SIGKILL, so no converter outlives a killed build.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable

PARENT_ENV = "SO8T_PARENT_PID"
PROGRESS_PREFIX = "so8t-progress "  # a child's progress line on stdout: `so8t-progress DONE TOTAL`
_PR_SET_PDEATHSIG = 1
_WAKE_S = 0.2


def die_with_parent() -> None:
    """Called first thing in a child: ask the kernel for SIGKILL when the parent goes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):  # the parent died before we could ask
        os._exit(1)


def run_child(command: list[str], on_line: Callable[[str], None] | None = None,
              env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `command` (stderr merged into stdout), feeding each output line (\\r or \\n ended) to on_line.

    Returns (exit code, its last lines). If anything interrupts the wait (Ctrl-C, SIGTERM, an error
    in on_line), the child is killed and reaped before the exception goes on.
    """
    child_env = {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env)
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=200)
    try:
        pending = b""
        while chunk := _read_some(proc.stdout.fileno()):  # what is there now: progress comes in \r pieces
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for raw in lines:
                line = raw.decode("utf-8", errors="replace")
                tail.append(line)
                if on_line is not None:
                    on_line(line)
        tail.append(pending.decode("utf-8", errors="replace"))
        return proc.wait(), "\n".join(line for line in tail if line.strip())
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()


def _read_some(fd: int) -> bytes:
    """The next bytes from `fd` (b"" at its end), waking now and then while there are none.

    The kernel may hand a Ctrl-C to any thread of this process (torch and the digest pool start
    some); a signal taken by another thread does not interrupt this one's read(). Waking every
    _WAKE_S seconds lets the interpreter run its handler, so an interrupt is never stuck behind a
    quiet child.
    """
    while not select.select([fd], [], [], _WAKE_S)[0]:
        pass
    return os.read(fd, 65536)


def report_progress(done: int, total: int) -> None:
    """The child's side of the progress protocol: one line on stdout, flushed."""
    sys.stdout.write(f"{PROGRESS_PREFIX}{done} {total}\n")  # the protocol to the parent, not user output
    sys.stdout.flush()


def progress_of(line: str) -> tuple[int, int] | None:
    """The parent's side: (done, total) of a progress line, None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    done, total = line[len(PROGRESS_PREFIX):].split()
    return int(done), int(total)


def last_lines(log: str, n: int = 5) -> str:
    """A child's last lines of output on one line, for an error message; progress lines left out."""
    lines = (line.strip() for line in log.splitlines() if line.strip() and progress_of(line) is None)
    return " | ".join(deque(lines, maxlen=n))
