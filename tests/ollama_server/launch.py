"""Starting test servers as separate processes from tests: OllamaTestServer and ServerPool."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

from tests.gotemplate import end_child, ensure_binary

from .common import REPO
from .store import PRUNE_GRACE_S

# --- starting servers from tests -------------------------------------------------------------------------

class OllamaTestServer:
    """One server process: OllamaTestServer(data_dir).start() -> url; .stop(); .restart(); .faults(...); .stats();
    .requests(); .clear_requests()."""

    __test__ = False  # not a pytest test class

    def __init__(self, data_dir: Path, *, version: str = "0.32.15", host: str = "127.0.0.1", seed: int = -1,
                 prune_grace: float = PRUNE_GRACE_S):
        self.data_dir, self.version, self.host, self.seed = Path(data_dir), version, host, seed
        self.prune_grace = prune_grace
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30, *, prune_grace: float | None = None) -> str:
        """Start the process and wait for its `listening on` line; returns the base URL. Raises
        GoToolchainMissing when the Go helper can be neither found nor built."""
        if self.proc is not None:
            raise RuntimeError(f"already running at {self.url}")
        ensure_binary()  # one clear error here rather than a server that dies at start
        self.data_dir.mkdir(parents=True, exist_ok=True)
        grace = self.prune_grace if prune_grace is None else prune_grace
        command = [sys.executable, "-m", "tests.ollama_server", "--port", "0", "--host", self.host,
                   "--data", str(self.data_dir), "--version", self.version, "--seed", str(self.seed),
                   "--prune-grace", str(grace)]
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log_file,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"ollama test server did not start ({line!r}); see {self.log_path}:\n"
                               + self.log_path.read_text()[-2000:])
        self.url = line.split()[-1]
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            end_child(self.proc, timeout=10)
            self.proc = None

    def restart(self, *, prune_grace: float | None = None) -> str:
        """Stop and start on the same data directory (a new port): models survive; unreferenced blobs older than
        the grace period (prune_grace for this start, else the server's: an hour) are pruned."""
        self.stop()
        return self.start(prune_grace=prune_grace)

    def _http(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        return httpx.request(method, f"{self.url}{path}", timeout=10, **kwargs).raise_for_status().json()

    def faults(self, **faults) -> dict:
        return self._http("POST", "/_test/faults", json=faults)

    def stats(self) -> dict:
        return self._http("GET", "/_test/stats")

    def requests(self) -> list[dict]:
        """Every request the server received since the last clear, in order (see Handler._log_request)."""
        return self._http("GET", "/_test/requests")["requests"]

    def clear_requests(self) -> list[dict]:
        return self._http("DELETE", "/_test/requests")["requests"]

    def __enter__(self) -> OllamaTestServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerPool:
    """What an `ollama_hosts` fixture wraps: pool.start(n) -> n new base URLs; pool.server(url); pool.stop_all()."""

    def __init__(self, base_dir: Path, version: str = "0.32.15"):
        self.base_dir, self.version, self.servers = Path(base_dir), version, []

    def start(self, n: int = 1, **kwargs) -> list[str]:
        new = [OllamaTestServer(self.base_dir / f"host-{len(self.servers) + i}", version=self.version, **kwargs)
               for i in range(n)]
        self.servers += new
        return [server.start() for server in new]

    def server(self, url: str) -> OllamaTestServer:
        return next(s for s in self.servers if s.url == url.rstrip("/"))

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()

