"""No output mode ever prints a secret (issue 14, acceptance 4).

Every mode (validate, plan, plan --json, apply, apply --json, each with and without -v) is scanned for a
header token and a URL's password: in a manifest that validate refuses (a token with a trailing newline,
credentials in the URL), and in one that is valid but whose host fails through the HTTP client: a closed port,
and a host that echoes the Authorization header back in its error, as a misconfigured proxy does.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .demo_manifests import write_demo_manifest

TOKEN = "tok-S3CRET-9z8y7x6w5v"
PASSWORD = "pw-S3CRET-4u3t2s"
MODES = [[*verbose, *command] for verbose in ([], ["-v"])
         for command in (["validate"], ["plan"], ["plan", "--json"], ["apply"], ["apply", "--json"])]


class _EchoingHost(BaseHTTPRequestHandler):
    """Refuses every request with the Authorization header it was sent, quoted in the error."""

    def _refuse(self) -> None:
        body = json.dumps({"error": f"rejected credentials {self.headers.get('Authorization')!r}"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_DELETE = _refuse

    def log_message(self, *args: object) -> None:  # the test's output is what is scanned: keep it quiet
        pass


@pytest.fixture
def echoing_host() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> str:
    with socket.socket() as s:  # bound, never listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def manifest(path: Path, demo: Path, url: str, authorization: str) -> Path:
    write_demo_manifest(path, demo, [url])
    text = path.read_text(encoding="utf-8")
    old = "timeout_s: 30}"
    assert old in text
    path.write_text(text.replace(old, f"timeout_s: 30, headers: {{Authorization: {json.dumps(authorization)}}}}}"),
                    encoding="utf-8")
    return path


def scan(run_cli, path: Path, cache: Path, secrets: tuple[str, ...]) -> dict[str, int]:
    """Run every mode; assert no secret in any output; return each mode's exit code."""
    codes = {}
    for mode in MODES:
        args = [*mode, path] + (["--cache-dir", cache] if mode[-1] != "validate" else [])
        result = run_cli(*args)
        for secret in secrets:
            assert secret not in result.out + result.err, f"{' '.join(mode)} printed a secret:\n{result.err}"
        codes[" ".join(mode)] = result.code
    return codes


def test_a_token_with_a_trailing_newline_is_never_printed(run_cli, demo, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_TOKEN", TOKEN + "\n")
    path = manifest(tmp_path / "m.yaml", demo, "http://127.0.0.1:9", "Bearer ${OLLAMA_TOKEN}")
    codes = scan(run_cli, path, tmp_path / "cache", (TOKEN,))
    assert set(codes.values()) == {2}, codes  # refused at load, in every mode


def test_url_credentials_are_never_printed(run_cli, demo, tmp_path):
    path = manifest(tmp_path / "m.yaml", demo, f"http://admin:{PASSWORD}@127.0.0.1:9", f"Bearer {TOKEN}")
    codes = scan(run_cli, path, tmp_path / "cache", (TOKEN, PASSWORD))
    assert set(codes.values()) == {2}, codes


def test_a_valid_token_is_never_printed_when_the_host_refuses_connections(run_cli, demo, tmp_path, closed_port,
                                                                          instant_retries):
    path = manifest(tmp_path / "m.yaml", demo, closed_port, f"Bearer {TOKEN}")
    codes = scan(run_cli, path, tmp_path / "cache", (TOKEN,))
    assert codes == {mode: 0 if mode.endswith("validate") else 1 for mode in codes}, codes
    assert {0.5, 1.0} <= set(instant_retries)  # each refused call was retried, with its backoff (not waited out)


def test_a_valid_token_echoed_by_the_host_is_redacted_everywhere(run_cli, demo, tmp_path, echoing_host):
    path = manifest(tmp_path / "m.yaml", demo, echoing_host, f"Bearer {TOKEN}")
    codes = scan(run_cli, path, tmp_path / "cache", (TOKEN,))
    assert codes == {mode: 0 if mode.endswith("validate") else 1 for mode in codes}, codes
    # The host's message did reach the output, with the token redacted: the scan above looked at it.
    result = run_cli("plan", "--json", path, "--cache-dir", tmp_path / "cache")
    [host] = json.loads(result.out)["hosts"]
    assert "rejected credentials '***'" in host["error"], host["error"]
    result = run_cli("apply", path, "--cache-dir", tmp_path / "cache")
    assert "rejected credentials '***'" in result.err.splitlines()[-1], result.err


def test_an_unexpected_error_quoting_the_token_is_redacted_with_and_without_v(run_cli, demo, tmp_path,
                                                                              closed_port, monkeypatch):
    from so8t_deploy.deploy import commands

    def bug(*args, **kwargs):  # a bug of ours, or a library's exception that quotes what it was given
        raise ValueError(f"cannot send Authorization: 'Bearer {TOKEN}'")

    monkeypatch.setattr(commands, "apply_manifest", bug)
    path = manifest(tmp_path / "m.yaml", demo, closed_port, f"Bearer {TOKEN}")
    for verbose in ([], ["-v"]):
        result = run_cli(*verbose, "apply", path, "--cache-dir", tmp_path / "cache")
        assert result.code == 1
        assert TOKEN not in result.out + result.err
        assert result.err.splitlines()[-1] == (f"{path}: apply: unexpected ValueError: cannot send Authorization: "
                                               "'***'; run with -v for the traceback")
        assert ("Traceback" in result.err) == bool(verbose)


def test_a_registry_password_is_never_printed(run_cli, demo, tmp_path, echoing_host, monkeypatch):
    monkeypatch.setenv("REGISTRY_PASSWORD", PASSWORD)
    path = manifest(tmp_path / "m.yaml", demo, echoing_host, f"Bearer {TOKEN}")
    registry = (f"distribution: {{registry: {{url: '{echoing_host}', namespace: so8t, insecure: true, "
                "auth: {username: deployer, password: '${REGISTRY_PASSWORD}'}}}\n")
    path.write_text(path.read_text(encoding="utf-8") + registry, encoding="utf-8")
    codes = scan(run_cli, path, tmp_path / "cache", (TOKEN, PASSWORD))
    assert codes == {mode: 0 if mode.endswith("validate") else 1 for mode in codes}, codes

    from so8t_deploy.deploy import commands

    def bug(*args, **kwargs):
        raise ValueError(f"cannot log in with {PASSWORD!r}")

    monkeypatch.setattr(commands, "apply_manifest", bug)
    result = run_cli("apply", path, "--cache-dir", tmp_path / "cache")
    assert PASSWORD not in result.err and "cannot log in with '***'" in result.err
