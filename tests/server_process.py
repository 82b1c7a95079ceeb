"""Run a test server (`python -m tests.X ...`) as its own process and wait until it listens.

The servers in tests/ print one line, ``listening on http://HOST:PORT``, once they accept connections; their
log (stderr) goes to a file next to their data, which a failed start quotes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import subprocess
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def end_process(proc: subprocess.Popen) -> None:
    """Terminate a process this test run started, killing it after 10 s, and reap it."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_arguments(module: str, description: str) -> argparse.ArgumentParser:
    """The options every test server has: --host and --port (0 picks a free one)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    return parser


def announce_and_serve(httpd: ThreadingHTTPServer) -> None:
    """Print the `listening on` line that `ServerProcess` waits for, then serve until interrupted."""
    httpd.daemon_threads = True
    host, port = httpd.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        httpd.serve_forever()


class ServerProcess:
    """ServerProcess(["tests.hub_server", "--root", DIR], DIR).start() -> base URL; .stop(); a context manager.
    The log goes to DIR.log, next to the server's data directory. The test servers' controllers subclass it."""

    __test__ = False  # not a pytest test class

    def __init__(self, module_and_args: list[str], data_dir: Path, *, name: str = ""):
        self.command = [sys.executable, "-m", *module_and_args]
        self.name = name or module_and_args[0]
        self.log_path = Path(data_dir).with_name(Path(data_dir).name + ".log")
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30) -> str:
        """Start the process and wait for its `listening on` line; returns the base URL."""
        if self.proc is not None:
            raise RuntimeError(f"already running at {self.url}")
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=subprocess.PIPE, stderr=log_file,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{self.name} did not start ({line!r}); see {self.log_path}:\n"
                               + self.log_path.read_text()[-2000:])
        self.url = line.split()[-1]
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc.stdout.close()
            self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
