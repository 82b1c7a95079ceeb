"""The two local Ollama-compatible demo hosts (there is no Ollama binary here): `make demo-hosts`, `make demo`.

    python -m tests.demo_hosts --serve        run both hosts until Ctrl-C (make demo-hosts)
    python -m tests.demo_hosts COMMAND...     run COMMAND against them, then ask every deployed tag for a reply
                                              (make demo)

The hosts are test servers (tests/ollama_server) on fixed loopback ports, the ones manifests/demo.yaml names by
default: host-a on 127.0.0.1:11534 and host-b on 127.0.0.1:11535 (a real Ollama's 11434 stays free). Set
OLLAMA_HOST_A / OLLAMA_HOST_B (http://127.0.0.1:PORT) to move them; the manifest reads the same variables.
Their stores, .so8t/demo-hosts/host-a and host-b under the current directory, persist across runs. COMMAND
reuses hosts that are already up (a `--serve` in another terminal) and otherwise starts and stops its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import ollama

from .ollama_server import OllamaTestServer

DEFAULT_HOSTS = {"host-a": ("OLLAMA_HOST_A", 11534), "host-b": ("OLLAMA_HOST_B", 11535)}
STORE = Path(".so8t") / "demo-hosts"


class DemoHostsError(RuntimeError):
    """A demo host that cannot start: a bad OLLAMA_HOST_* or a port in use."""


def demo_ports(env: dict[str, str]) -> dict[str, int]:
    """Each demo host's port: from OLLAMA_HOST_A / OLLAMA_HOST_B when set, else 11534 and 11535."""
    ports = {}
    for name, (variable, default) in DEFAULT_HOSTS.items():
        url = env.get(variable)
        if not url:
            ports[name] = default
            continue
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or not parts.port:
            raise DemoHostsError(f"{variable}={url}: the demo hosts and manifests/demo.yaml read it, and the "
                                 f"demo hosts run on loopback: unset it, or set it to http://127.0.0.1:PORT")
        ports[name] = parts.port
    return ports


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_hosts(ports: dict[str, int], store: Path) -> list[OllamaTestServer]:
    """Start one test server per demo host on its port, side by side; all or none."""
    for name, port in ports.items():
        if listening(port):
            raise DemoHostsError(f"127.0.0.1:{port} ({name}) is in use: is `make demo-hosts` running elsewhere? "
                                 f"Otherwise set {DEFAULT_HOSTS[name][0]}=http://127.0.0.1:PORT")
    servers = [OllamaTestServer(store / name, port=port) for name, port in ports.items()]
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(OllamaTestServer.start, servers))
        return servers
    except BaseException:
        stop_hosts(servers)
        raise


def stop_hosts(servers: list[OllamaTestServer]) -> None:
    for server in servers:  # all at once, then wait for each
        if server.proc is not None and server.proc.poll() is None:
            server.proc.terminate()
    for server in servers:
        server.stop()


def serve(ports: dict[str, int], store: Path) -> int:
    """Run the hosts in the foreground until Ctrl-C or SIGTERM (exit 0) or until one of them dies (exit 1)."""
    # Ctrl-C and SIGTERM stop it cleanly, even when started with SIGINT ignored (as `cmd &` in a script does).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        servers = start_hosts(ports, store)
    except KeyboardInterrupt:  # start_hosts stopped what it had started
        return 0
    try:
        for name, server in zip(ports, servers, strict=True):
            print(f"{name}: {server.url}  (store {server.data_dir}, log {server.log_path})", flush=True)
        print("demo hosts up; Ctrl-C stops both. Try `so8t-deploy plan manifests/demo.yaml` in another terminal "
              "(README: The first hour).", flush=True)
        while all(server.proc.poll() is None for server in servers):
            time.sleep(0.5)
        dead = next(server for server in servers if server.proc.poll() is not None)
        print(f"a demo host exited ({dead.proc.returncode}); see {dead.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave a host behind
        stop_hosts(servers)
        print("demo hosts stopped", flush=True)


def run(argv: list[str], ports: dict[str, int], store: Path) -> int:
    """Run argv with both hosts up, then ask every deployed model (but the -prev backups) for a reply."""
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    if all(answers(url) for url in urls.values()):
        servers = []
        print(f"demo hosts already up: {' and '.join(urls.values())}", flush=True)
    else:
        servers = start_hosts(ports, store)
        print(f"demo hosts: {' and '.join(urls.values())}", flush=True)
    try:
        env = {**os.environ, **{DEFAULT_HOSTS[name][0]: url for name, url in urls.items()}}
        code = subprocess.run(argv, env=env).returncode
        if code == 0:
            for url in urls.values():
                client = ollama.Client(host=url, timeout=120)
                for model in sorted(m.model for m in client.list().models if not m.model.endswith("-prev")):
                    reply = client.generate(model=model, prompt="Say hello.", options={"num_predict": 12})
                    print(f"{url} {model}: {reply.response.strip()[:60]!r}")
        return code
    finally:
        stop_hosts(servers)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        ports = demo_ports(dict(os.environ))
        store = STORE.resolve()
        return serve(ports, store) if argv == ["--serve"] else run(argv, ports, store)
    except DemoHostsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
