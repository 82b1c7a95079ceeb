"""Run a command with two local Ollama-compatible hosts up, for `make demo` (no Ollama binary here).

    python -m tests.demo_hosts COMMAND...

Starts two test servers (tests/ollama_server.py) on free loopback ports with stores under
.so8t/demo-hosts, exports OLLAMA_HOST_A and OLLAMA_HOST_B, runs COMMAND, asks every deployed
model for a reply through the official ollama client, and stops the servers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import ollama

from .ollama_server import REPO, ServerPool


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    pool = ServerPool(REPO / ".so8t" / "demo-hosts")
    try:
        host_a, host_b = pool.start(2)
        print(f"demo hosts: {host_a} and {host_b}", flush=True)
        code = subprocess.run(argv, env={**os.environ, "OLLAMA_HOST_A": host_a, "OLLAMA_HOST_B": host_b}).returncode
        if code == 0:
            for url in (host_a, host_b):
                client = ollama.Client(host=url, timeout=120)
                for model in sorted(m.model for m in client.list().models if not m.model.endswith("-prev")):
                    reply = client.generate(model=model, prompt="Say hello.", options={"num_predict": 12})
                    print(f"{url} {model}: {reply.response.strip()[:60]!r}")
        return code
    finally:
        pool.stop_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
