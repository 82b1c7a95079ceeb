"""Starting test servers as separate processes from tests: OllamaTestServer and ServerPool."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.gotemplate import ensure_binary
from tests.server_process import ServerProcess

from .store import PRUNE_GRACE_S
from .templates import ensure_gothink

# --- starting servers from tests -------------------------------------------------------------------------

class OllamaTestServer(ServerProcess):
    """One server process: OllamaTestServer(data_dir).start() -> url; .stop(); .restart(); .faults(...); .stats();
    .requests(); .clear_requests(). `port` 0 (the default) picks a free port at every start."""

    def __init__(self, data_dir: Path, *, version: str = "0.32.15", host: str = "127.0.0.1", port: int = 0,
                 seed: int = -1, prune_grace: float = PRUNE_GRACE_S):
        self.data_dir, self.version, self.host, self.port, self.seed = Path(data_dir), version, host, port, seed
        self.prune_grace = prune_grace
        super().__init__(self._arguments(prune_grace), self.data_dir, name="ollama test server")

    def _arguments(self, prune_grace: float) -> list[str]:
        return ["tests.ollama_server", "--port", str(self.port), "--host", self.host, "--data", str(self.data_dir),
                "--version", self.version, "--seed", str(self.seed), "--prune-grace", str(prune_grace)]

    def start(self, timeout: float = 30, *, prune_grace: float | None = None) -> str:
        """Start the process and wait for its `listening on` line; returns the base URL. Raises
        GoToolchainMissing when the Go helper can be neither found nor built."""
        if self.proc is None:
            ensure_binary()  # one clear error here rather than a server that dies at start
            ensure_gothink()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            grace = self.prune_grace if prune_grace is None else prune_grace
            self.command = [sys.executable, "-m", *self._arguments(grace)]
        return super().start(timeout)

    def restart(self, *, prune_grace: float | None = None) -> str:
        """Stop and start on the same data directory (a new port unless `port` is fixed): models survive;
        unreferenced blobs older than the grace period (prune_grace for this start, else the server's: an hour)
        are pruned."""
        self.stop()
        return self.start(prune_grace=prune_grace)

    def _http(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        from so8t_deploy.external.ollama_host import tls_context

        return httpx.request(method, f"{self.url}{path}", timeout=10, verify=tls_context(),
                             **kwargs).raise_for_status().json()

    def faults(self, **faults) -> dict:
        return self._http("POST", "/_test/faults", json=faults)

    def stats(self) -> dict:
        return self._http("GET", "/_test/stats")

    def requests(self) -> list[dict]:
        """Every request the server received since the last clear, in order (see Handler._log_request)."""
        return self._http("GET", "/_test/requests")["requests"]

    def clear_requests(self) -> list[dict]:
        return self._http("DELETE", "/_test/requests")["requests"]


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

