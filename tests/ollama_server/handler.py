"""HTTP for the test server: routing, bodies, NDJSON streams, blobs, the request log; and `serve`/`main`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.gotemplate import GoTemplates, GoToolchainMissing, ensure_binary
from tests.gotemplate.gofmt import go_json

from . import __doc__ as PACKAGE_DOC
from .api import App
from .common import CHUNK, ApiError, log
from .create import CreateJob
from .pull import PullJob
from .store import PRUNE_GRACE_S, Store
from .templates import ensure_gothink

# --- HTTP -----------------------------------------------------------------------------------------------

class _Dropped(Exception):
    """The connection is gone (or was cut on purpose): send nothing more."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ollama-test-server"
    app: App  # set on the subclass by serve()

    ROUTES = {
        ("GET", "/api/version"): lambda app, req: {"version": app.version()},
        ("GET", "/api/tags"): lambda app, req: app.tags(),
        ("GET", "/api/ps"): lambda app, req: {"models": app.models.ps()},
        ("POST", "/api/show"): App.show,
        ("POST", "/api/copy"): App.copy,
        ("DELETE", "/api/delete"): App.delete,
        ("POST", "/api/create"): App.create,
        ("POST", "/api/pull"): App.pull,
        ("POST", "/api/generate"): lambda app, req: app.generate(req, chat=False),
        ("POST", "/api/chat"): lambda app, req: app.generate(req, chat=True),
        ("POST", "/_test/faults"): App.set_faults,
        ("GET", "/_test/faults"): lambda app, req: app.set_faults({}),
        ("GET", "/_test/stats"): lambda app, req: dict(app.stats),
        ("GET", "/_test/requests"): lambda app, req: app.request_log(),
        ("DELETE", "/_test/requests"): lambda app, req: app.request_log(clear=True),
    }
    BODYLESS = {("DELETE", "/_test/requests")}

    def log_message(self, format: str, *args) -> None:
        log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path.startswith("/api/blobs/"):
                self._log_request(method, None)
                self._blob(method, path[len("/api/blobs/"):])
            elif (method, path) in self.ROUTES:
                self._api(self.ROUTES[method, path], method, path)
            else:
                self._log_request(method, None)
                self._discard_body()
                if path == "/" and method in ("GET", "HEAD"):  # Ollama's health check
                    self._reply(200, None, text=b"Ollama is running")
                elif any(p == path for _, p in self.ROUTES):
                    self._reply(405, {"error": "405 method not allowed"})
                else:
                    self._reply(404, {"error": "404 page not found"})
        except ApiError as exc:
            self._reply(exc.status, {"error": str(exc)})
        except (_Dropped, ConnectionError) as exc:  # ConnectionError: the client left before the answer
            log(f"{method} {path}: connection dropped ({exc!r})")
            self.close_connection = True
        except Exception as exc:  # a bug here must still answer, and show in the log
            log(f"{method} {path}: {traceback.format_exc()}")
            with contextlib.suppress(OSError):
                self._reply(500, {"error": f"internal error: {exc}"}, close=True)

    def _log_request(self, method: str, body: object) -> None:
        """The request log of /_test/requests, appended as a request arrives (test endpoints excluded)."""
        if self.path.startswith("/_test/"):
            return
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            key = key.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.app.log_request({"method": method, "path": self.path, "headers": headers, "body": body,
                              "time": time.monotonic()})

    # -- plumbing --

    def _reply(self, status: int, body: dict | None, *, close: bool = False, text: bytes | None = None) -> None:
        data = text if text is not None else b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _body_chunks(self, limit: int | None = None) -> Iterator[bytes]:
        """The request body in pieces of at most 1 MiB, from Content-Length or chunked transfer encoding.
        A body that ends early raises _Dropped; `limit` stops after that many bytes."""
        def read(n: int) -> bytes:
            data = self.rfile.read(n)
            if len(data) < n:
                raise _Dropped("body ended early")
            return data

        def sized(length: int) -> Iterator[bytes]:
            while length > 0:
                data = read(min(CHUNK, length))
                length -= len(data)
                yield data

        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            pieces = self._chunked(read, sized)
        else:
            pieces = sized(int(self.headers.get("Content-Length") or 0))
        total = 0
        for piece in pieces:
            if limit is not None and total + len(piece) >= limit:
                yield piece[:limit - total]
                return
            total += len(piece)
            yield piece

    def _chunked(self, read, sized) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise _Dropped("chunk header ended early")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return
            yield from sized(size)
            read(2)  # CRLF after the chunk

    def _discard_body(self) -> dict:
        """Read what the client sent, so that the connection stays usable for its next request."""
        for _ in self._body_chunks():
            pass
        return {}

    def _json(self) -> tuple[dict | None, str | None]:
        """The JSON object of the body, or the error Ollama's binding answers with."""
        data = b"".join(self._body_chunks())
        if not data:
            return None, "missing request body"
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, f"invalid JSON: {exc}"
        if not isinstance(body, dict):
            return None, "json: cannot unmarshal into Go value of type object"
        return body, None

    def _api(self, route, method: str, path: str) -> None:
        if method in ("POST", "DELETE") and (method, path) not in self.BODYLESS:
            req, error = self._json()
            self._log_request(method, req)
            if error:
                raise ApiError(400, error)
        else:
            self._log_request(method, None)
            req = self._discard_body()
        result = route(self.app, req)
        if isinstance(result, CreateJob):
            if isinstance(result, PullJob):
                self._watch_client(result)
            self._stream_job(result) if result.stream else self._wait_job(result)
        elif isinstance(result, tuple):
            self._reply(*result)
        elif result is None or isinstance(result, dict):
            self._reply(200, result)
        elif req.get("stream") is False:
            self._collect(result)
        else:
            self._stream(result)

    def _collect(self, events: Iterator[dict]) -> None:
        """`"stream": false`: the last object is the answer, an error becomes the HTTP status."""
        last: dict = {}
        try:
            for event in events:
                last = event
        except ApiError as exc:
            return self._reply(exc.status, {"error": str(exc)})
        except Exception as exc:  # e.g. llama.cpp failing halfway
            log(traceback.format_exc())
            return self._reply(500, {"error": str(exc)})
        self._reply(200, last)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _stream(self, events: Iterator[dict]) -> None:
        """NDJSON in chunked encoding; an error after the headers is a last `{"error": ...}` line."""
        self._start_stream()
        try:
            try:
                for event in events:
                    self._write_chunk(json.dumps(event).encode() + b"\n")
            except Exception as exc:  # any failure after the headers is an error line
                if not isinstance(exc, ApiError):
                    log(traceback.format_exc())
                self._write_chunk(json.dumps({"error": str(exc)}).encode() + b"\n")
            self._write_chunk(b"")
        except OSError:  # the client went away: stop generating
            self.close_connection = True
        finally:
            if hasattr(events, "close"):
                events.close()

    def _stream_job(self, job: CreateJob) -> None:
        """streamResponse under gin's Stream: take a line, write it, stop when the client is gone (the worker
        then waits forever on its next line). Nothing is written before the first line, so an error there is
        a plain HTTP error."""
        started = False
        try:
            while (event := job.channel.receive()) is not None:
                if "error" in event:
                    if not started:
                        return self._reply(event.get("status") or 500, {"error": event["error"]})
                    self._write_chunk(go_json({"error": event["error"]}).encode() + b"\n")
                    break
                if not started:
                    self._start_stream()
                    started = True
                self._write_chunk(go_json(event, sort_keys=False).encode() + b"\n")
                if self._client_gone():
                    raise _Dropped("client went away during a create")
            if not started:  # the worker always sends a line or an error; this is a bug in it
                return self._reply(500, {"error": "create ended without a status"})
            self._write_chunk(b"")
        except (OSError, _Dropped) as exc:
            job.channel.abandon()
            log(f"{job.kind} of {job.name.display()}: stopped reading its lines ({exc})")
            self.close_connection = True

    def _wait_job(self, job: CreateJob) -> None:
        """waitForStream: read every line whatever the client does; answer with the last one or the error."""
        latest: dict = {}
        while (event := job.channel.receive()) is not None:
            if "error" in event:
                return self._reply(event.get("status") or 500, {"error": event["error"]})
            latest = event
        self._reply(200, latest)

    def _watch_client(self, job: PullJob) -> None:
        """A pull runs in the request's context, which Go cancels when the client goes away, even while no line
        is written (or with "stream": false): watch the connection until the pull is done."""
        def watch() -> None:
            while not job.finished.wait(0.1):
                if self._client_gone():
                    log(f"pull of {job.name.display()}: the client went away; cancelling it")
                    job.ctx.cancel()
                    return

        threading.Thread(target=watch, daemon=True, name=f"watch {job.name.display()}").start()

    def _client_gone(self) -> bool:
        """Whether the peer closed its end (Go's CloseNotify): readable with nothing to read."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # ValueError: closed meanwhile (the pull watcher runs in its own thread)
            return True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # -- blobs --

    def _blob(self, method: str, digest: str) -> None:
        store = self.app.store
        if method not in ("HEAD", "POST"):
            return self._reply_unread(405, {"error": "405 method not allowed"}, method)
        try:
            path = store.blob_path(digest)
        except ApiError as exc:
            return self._reply_unread(exc.status, {"error": str(exc)}, method)
        if method == "HEAD":
            return self._reply(200 if path.is_file() else 404, None)
        if path.is_file():
            return self._reply_unread(200, None, method)
        self._upload(digest)

    def _reply_unread(self, status: int, body: dict | None, method: str) -> None:
        """Answer without reading the body, then close: the unread body would corrupt the next request.
        The rest of the body is drained and discarded (a "lingering close"), so the client, which sends its
        whole body before it reads the answer, gets the answer instead of a connection reset."""
        has_body = method == "POST" and (self.headers.get("Content-Length", "0") != "0"
                                         or "Transfer-Encoding" in self.headers)
        self._reply(status, body, close=has_body)
        if has_body:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and select.select([self.connection], [], [], 5)[0]:
                    if not self.connection.recv(CHUNK):
                        break

    def _upload(self, digest: str) -> None:
        """CreateBlobHandler: the body becomes a blob named by what it hashes to, even when that is not the
        digest asked for (then the answer is 400 "digest mismatch, ...")."""
        app, store = self.app, self.app.store
        cut_after = app.take_cut()
        received = 0

        def counted(pieces: Iterator[bytes]) -> Iterator[bytes]:
            nonlocal received
            for piece in pieces:
                received += len(piece)
                yield piece

        try:
            if cut_after is not None:
                for _ in counted(self._body_chunks(limit=cut_after)):
                    pass
                log(f"fault: cutting the upload of {digest} after {received} bytes")
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                raise _Dropped("cut on purpose")
            layer = store.new_layer(counted(self._body_chunks()), "")
        finally:
            app.count("bytes_received", received)
        if layer.digest != digest:
            raise ApiError(400, f'digest mismatch, expected "{digest}", got "{layer.digest}"')
        self._reply(201, None)


def serve(host: str, port: int, data: Path, version: str, seed: int = -1,
          prune_grace: float = PRUNE_GRACE_S) -> None:
    try:
        ensure_binary()
        ensure_gothink()
    except GoToolchainMissing as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    store = Store(data)
    for leftover in store.tmp.iterdir():  # partial uploads and rewrites of a server that was killed
        leftover.unlink()
    if not os.environ.get("OLLAMA_NOPRUNE"):
        log(f"pruned {store.prune(prune_grace)} unreferenced blobs older than {prune_grace:g} s")
    handler = type("BoundHandler", (Handler,), {"app": App(store, version, GoTemplates(), seed)})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    print(f"listening on http://{host}:{httpd.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        httpd.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.ollama_server", description=PACKAGE_DOC.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--data", type=Path, required=True, help="blobs and manifests; kept across restarts")
    parser.add_argument("--version", default="0.32.15", help="what /api/version reports")
    parser.add_argument("--seed", type=int, default=-1,
                        help="sampling seed for requests that set none (default -1: a random one, like Ollama)")
    parser.add_argument("--prune-grace", type=float, default=PRUNE_GRACE_S,
                        help="at start, prune unreferenced blobs older than this many seconds (Ollama: 3600)")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.data, args.version, args.seed, args.prune_grace)
