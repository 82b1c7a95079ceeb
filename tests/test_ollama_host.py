"""The Ollama host adapter against small scripted HTTP servers: headers, timeouts, odd servers, /api/show.

These need neither llama.cpp nor the Ollama test server: each test scripts the answers it needs
and records every request, so transport behaviour is checked byte for byte.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from so8t_deploy.errors import HostError, HostUnreachableError
from so8t_deploy.external.ollama_host import (
    CREATE_BASE_TIMEOUT_S,
    Clock,
    CreateFailed,
    CreateRequest,
    OllamaHost,
    create_read_timeout,
)
from so8t_deploy.external.ollama_show import ShownModel, go_unquote, parse_go_value, same_parameters

Reply = tuple[int, str, bytes] | Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: dict[tuple[str, str], Reply]
    seen: list[dict]

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                          "body": body})
        reply = self.routes.get((self.command, self.path), (404, "text/plain", b"404 page not found"))
        if callable(reply):
            reply(self)
            return
        status, content_type, data = reply
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_HEAD = do_DELETE = _handle


@pytest.fixture
def scripted():
    """scripted({(METHOD, PATH): (status, content_type, body) | handler_fn}) -> (url, seen requests)."""
    servers = []

    def start(routes: dict) -> tuple[str, list[dict]]:
        seen: list[dict] = []
        handler = type("H", (Handler,), {"routes": routes, "seen": seen})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def start_ndjson(handler: Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/x-ndjson")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()


def write_chunk(handler: Handler, data: bytes) -> None:
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    handler.wfile.flush()


def ok_json(data: object, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json; charset=utf-8", json.dumps(data).encode()


VERSION = {("GET", "/api/version"): ok_json({"version": "0.32.15"})}
TAGS = {("GET", "/api/tags"): ok_json({"models": [{"name": "a:latest", "model": "a:latest", "digest": "d1",
                                                    "modified_at": "2026-01-01T00:00:00Z", "size": 1}]})}


def test_operator_api_key_never_reaches_a_target(scripted, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", "sk-operator-secret")
    url, seen = scripted({**VERSION, **TAGS})
    with OllamaHost("h", url) as host:
        host.check_version()  # plain HTTP path
        host.tags()  # ollama client path
    assert len(seen) == 2
    for request in seen:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert "authorization" not in headers
        assert "sk-operator-secret" not in json.dumps(request["headers"])


def test_manifest_headers_are_sent_on_both_paths(scripted, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", "sk-operator-secret")
    url, seen = scripted({**VERSION, **TAGS})
    with OllamaHost("h", url, {"Authorization": "Bearer manifest-token", "X-Team": "ml"}) as host:
        host.version()
        host.tags()
    for request in seen:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers["authorization"] == "Bearer manifest-token" and headers["x-team"] == "ml"


@pytest.mark.parametrize("routes", [
    {("GET", "/api/version"): (404, "text/html", b"<html><body><h1>Not Found</h1>" + b"x" * 5000 + b"</body></html>")},
    {("GET", "/api/version"): (200, "text/html", b"<!doctype html><html>welcome to nginx</html>")},
    {("GET", "/api/version"): ok_json({"status": "fine"})},
])
def test_a_server_that_is_not_ollama_gets_one_line(scripted, routes):
    url, _ = scripted(routes)
    with OllamaHost("h", url) as host, pytest.raises(HostError) as error:
        host.check_version()
    message = str(error.value)
    assert "not an Ollama server" in message and "\n" not in message and "<" not in message and len(message) < 200


def test_a_redirect_is_not_followed(scripted):
    def redirect(handler: Handler) -> None:
        handler.send_response(301)
        handler.send_header("Location", "https://elsewhere.example/api/version")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    url, seen = scripted({("GET", "/api/version"): redirect})
    with OllamaHost("h", url) as host, pytest.raises(HostError, match="redirects to https://elsewhere.example"):
        host.check_version()
    assert len(seen) == 1


def test_a_source_build_is_accepted_with_a_warning(scripted):
    url, _ = scripted({("GET", "/api/version"): ok_json({"version": "0.0.0"})})
    with OllamaHost("h", url) as host:
        assert host.check_version() == "0.0.0"
        assert len(host.warnings) == 1 and "source build" in host.warnings[0]


def test_an_old_server_is_refused(scripted):
    url, _ = scripted({("GET", "/api/version"): ok_json({"version": "0.5.4"})})
    with OllamaHost("h", url) as host, pytest.raises(HostError, match=r"0\.5\.4 is too old.*>= 0\.5\.5"):
        host.check_version()


def test_a_host_that_is_down_is_unreachable_after_retries():
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with OllamaHost("h", f"http://127.0.0.1:{port}", retries=2, backoff=0.01) as host, \
            pytest.raises(HostUnreachableError, match="unreachable"):
        host.tags()


def test_ordinary_calls_time_out_but_a_create_waits_and_is_not_streamed(scripted):
    """A create silent for longer than the ordinary read timeout is waited for, sent once, with stream false."""

    def slow_tags(handler: Handler) -> None:
        time.sleep(1.5)
        ok = json.dumps({"models": []}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(ok)))
        handler.end_headers()
        handler.wfile.write(ok)

    def silent_create(handler: Handler) -> None:
        time.sleep(1.5)
        ok = json.dumps({"status": "success"}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(ok)))
        handler.end_headers()
        handler.wfile.write(ok)

    url, seen = scripted({("GET", "/api/tags"): slow_tags, ("POST", "/api/create"): silent_create})
    with OllamaHost("h", url, timeout=0.5, retries=1) as host:
        with pytest.raises(HostUnreachableError, match="timed out"):
            host.tags()
        host.create(CreateRequest("m:t", {"m.gguf": "sha256:" + "0" * 64}, "{{ .Prompt }}"), size=10)
    [create] = [r for r in seen if r["method"] == "POST"]
    assert create["path"] == "/api/create" and json.loads(create["body"])["stream"] is False


def test_create_errors_are_never_retried(scripted):
    url, seen = scripted({("POST", "/api/create"): ok_json({"error": "template: :1: unexpected \"}\""}, 400)})
    with OllamaHost("h", url) as host, pytest.raises(CreateFailed, match=r"unexpected .*\(HTTP 400\)"):
        host.create(CreateRequest("m:t", {"m.gguf": "sha256:" + "0" * 64}, "{{ .Prompt }"), size=10)
    url2, seen2 = scripted({("POST", "/api/create"): ok_json({"error": "boom"}, 500)})
    with OllamaHost("h", url2) as host, pytest.raises(CreateFailed, match=r"boom \(HTTP 500\)"):
        host.create(CreateRequest("m:t", {"m.gguf": "sha256:" + "0" * 64}, "t"), size=10)
    assert len(seen) == 1 and len(seen2) == 1


class FakeClock(Clock):
    """Time that passes only when waited on: polls after a lost answer cost no real seconds."""

    def __init__(self) -> None:
        now = [0.0]
        object.__setattr__(self, "now", now)
        super().__init__(monotonic=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))


def tags_after(polls: int, name: str) -> Callable[[Handler], None]:
    """/api/tags that lists `name` from its `polls`-th answer on (the create landing meanwhile)."""
    answered = [0]

    def reply(handler: Handler) -> None:
        answered[0] += 1
        models = [{"name": name, "model": name, "digest": "d", "modified_at": "2026-01-01T00:00:00Z", "size": 1}]
        data = json.dumps({"models": models if answered[0] >= polls else []}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return reply


def drop_connection(handler: Handler) -> None:
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)  # no status line: what a proxy cutting an idle connection does


@pytest.mark.parametrize("answer", ["dropped", "gateway timeout", "not success"])
def test_a_create_whose_answer_is_lost_is_not_resent_and_is_found_by_polling(scripted, answer):
    replies = {"dropped": drop_connection, "gateway timeout": (504, "text/html", b"<html>504 Gateway Time-out</html>"),
               "not success": ok_json({"status": "writing manifest"})}
    url, seen = scripted({("POST", "/api/create"): replies[answer], ("GET", "/api/tags"): tags_after(3, "m:t")})
    with OllamaHost("h", url, clock=FakeClock()) as host:
        host.create(CreateRequest("m:t", {"m.gguf": "sha256:" + "0" * 64}, "t"), size=10)
    assert [r["path"] for r in seen] == ["/api/create", "/api/tags", "/api/tags", "/api/tags"]


def test_a_lost_create_that_never_appears_fails_at_its_deadline(scripted):
    url, seen = scripted({("POST", "/api/create"): drop_connection, ("GET", "/api/tags"): ok_json({"models": []})})
    clock = FakeClock()
    with OllamaHost("h", url, clock=clock) as host, pytest.raises(CreateFailed, match="did not appear"):
        host.create(CreateRequest("m:t", {"m.gguf": "sha256:" + "0" * 64}, "t"), size=80 << 20)
    assert clock.monotonic() == pytest.approx(create_read_timeout(80 << 20))  # 10 min + 10 s for 80 MiB
    assert [r["path"] for r in seen].count("/api/create") == 1


def test_create_timeout_scales_with_the_file():
    assert create_read_timeout(0) == CREATE_BASE_TIMEOUT_S
    assert create_read_timeout(7_640_000_000) > CREATE_BASE_TIMEOUT_S + 900  # a 7.6 GB f16: minutes more


@pytest.mark.parametrize(("printed", "value"), [
    ('"<|end|>"', "<|end|>"), ('"a\\x1bb"', "a\x1bb"), ('"tab\\there \\"q\\" \\\\ \\u00e9 \\U0001f600"',
                                                        'tab\there "q" \\ é 😀'),
    ("1.048576e+06", 1048576), ("4096", 4096), ("0.7", 0.7), ("1e-05", 1e-05), ("true", True), ("-1", -1),
])
def test_go_values_as_show_prints_them(printed, value):
    assert parse_go_value(printed) == value


def test_show_parameters_in_any_order_compare_as_stored():
    shown = ShownModel.from_json({"template": "t", "parameters": (
        'stop                           "<|user|>"\n'
        'num_ctx                        4096\n'
        'temperature                    0.7\n'
        'stop                           "<|end|>"\n'
        'num_batch                      1.048576e+06')})
    wanted = {"temperature": 0.7, "num_ctx": 4096, "num_batch": 1048576, "stop": ["<|user|>", "<|end|>"]}
    assert same_parameters(wanted, shown.parameters)
    assert not same_parameters({**wanted, "num_ctx": 2048}, shown.parameters)
    assert not same_parameters({**wanted, "stop": ["<|end|>", "<|user|>"]}, shown.parameters)
    assert go_unquote('"\\101\\x42"') == "AB"


def test_the_template_sent_is_read_from_the_modelfile_not_the_template_shown():
    go = '{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n'
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    modelfile = f'# Modelfile generated by "ollama show"\nFROM /blobs/sha256-0\nTEMPLATE """{go}"""\nSYSTEM x\n'
    # a host that prefers the GGUF's own Jinja template shows it as `template`; the modelfile keeps what was sent
    shown = ShownModel.from_json({"template": jinja, "modelfile": modelfile, "capabilities": ["completion", "tools"]})
    assert shown.template == jinja and shown.sent_template == go and shown.capabilities == ("completion", "tools")
    older = ShownModel.from_json({"template": go, "modelfile": "FROM x\nTEMPLATE \"\"\"unclosed"})
    assert older.sent_template == go and older.capabilities is None  # an unreadable modelfile: the field
