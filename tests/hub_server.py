"""A Hugging Face Hub-compatible HTTP endpoint for tests, serving the repos of tests/hub_repos.py.

Run it as its own process from the repository root:

    python -m tests.hub_server --port 0 --root DIR [--host 127.0.0.1]

It prints one line, ``listening on http://HOST:PORT``, once it accepts connections. Point huggingface_hub at it with
``HF_ENDPOINT`` (read when huggingface_hub is imported) or ``endpoint=``. Repos are read from disk on every request,
so a test changes them (commits, moved branches, gating) through `HubRepo` while the server runs.

What it serves, as the Hub answers huggingface_hub 2.4 (model repos only):
- GET /api/models/{repo}[/revision/{rev}][?blobs=true]: model info; `sha` is the revision's commit; with blobs=true
  each sibling has size, blobId and, for an LFS file, lfs {sha256, size, pointerSize}.
- GET /api/models/{repo}/tree/{rev}[/{path}][?recursive=true], POST /api/models/{repo}/paths-info/{rev} (form
  `paths`): entries {type, path, size, oid (git blob id), lfs: {oid (the sha256), size, pointerSize}};
  GET /api/models/{repo}/refs. No pagination: the Hub pages at 1000 entries.
- HEAD/GET /{repo}/resolve/{rev}/{path}: X-Repo-Commit always. A regular file is served here with ETag (its git blob
  id). An LFS file answers 302 with X-Linked-Etag (its sha256), X-Linked-Size and a Location on the LFS storage, which
  listens on a second port: another origin, like the Hub's CDN, so the client's HEAD stops at the 302 and its
  download drops Authorization. Both serve a single `Range: bytes=` (206 + Content-Range, 416 past the end).
- Errors have X-Error-Code, X-Error-Message and {"error": ...}: RepoNotFound (401 without a token, 404 with one),
  RevisionNotFound (404), EntryNotFound (404, with X-Repo-Commit), GatedRepo (401 without a token, 403 with one
  not granted). A gated repo's metadata (info, tree) stays public, as on the Hub; only its files need the token.
- GET /api/agent-harnesses: an empty registry (huggingface_hub asks the endpoint for it unless telemetry is off).

Test-only, not the Hub:
- POST /_test/faults (see FAULT_DEFAULTS): cut the next GETs of a file after N body bytes, or at an offset in the file.
- GET /_test/requests: every request to either port; POST /_test/reset clears the log and the faults.
- `HubTestServer` starts and controls the process from tests.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import socket
import struct
import sys
import threading
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.hub_repos import HubRepo, LocalHub, dir_entry, file_entry, model_info, refs, tree_entries
from tests.server_process import ServerProcess, announce_and_serve, server_arguments

CHUNK = 1 << 16
FAULT_DEFAULTS: dict = {
    "cut_file": None,  # glob of repo paths whose next GETs are cut; None cuts nothing
    "cut_after_bytes": 0,  # body bytes sent before the connection goes
    "cut_times": 1,  # how many GETs in a row are cut
    "cut_mode": "close",  # "close": a clean close, the body is short; "reset": a TCP reset
    "cut_counted_from": "body",  # "body": cut_after_bytes of this answer's body; "file": an offset in the file,
                                 # so a GET that resumes at or past it is cut before its first byte
    "api_answer": None,  # {"status", "content_type", "body"}: every /api/ request gets this instead (a wrong hub)
    "sibling_patch": None,  # {repo path: {field: value}} merged into that sibling of model info (hostile metadata)
}
RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class HubError(Exception):
    """An error answer: status, X-Error-Code and message, as the Hub sends them."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


def log(message: str) -> None:
    print(f"[hub-test-server] {message}", file=sys.stderr, flush=True)


class App:
    """What both ports share: the repos, the faults and the request log."""

    def __init__(self, hub: LocalHub):
        self.hub, self.lock = hub, threading.Lock()
        self.faults, self.requests = dict(FAULT_DEFAULTS), []
        self.lfs_url = ""

    def set_faults(self, req: dict) -> dict:
        unknown = set(req) - set(FAULT_DEFAULTS) - {"reset"}
        if unknown:
            raise HubError(400, None, f"unknown faults: {sorted(unknown)}")
        if req.get("cut_mode", "close") not in ("close", "reset"):
            raise HubError(400, None, "cut_mode is 'close' or 'reset'")
        if req.get("cut_counted_from", "body") not in ("body", "file"):
            raise HubError(400, None, "cut_counted_from is 'body' or 'file'")
        with self.lock:
            if req.get("reset"):
                self.faults = dict(FAULT_DEFAULTS)
            self.faults.update({k: v for k, v in req.items() if k != "reset"})
            return dict(self.faults)

    def take_cut(self, path: str, start: int) -> tuple[int, str] | None:
        """(body bytes to send, mode) if this GET of `path`, from byte `start`, is to be cut."""
        with self.lock:
            pattern = self.faults["cut_file"]
            if pattern is None or not fnmatch.fnmatchcase(path, pattern):
                return None
            after = int(self.faults["cut_after_bytes"])
            if self.faults["cut_counted_from"] == "file":
                after = max(after - start, 0)
            cut = (after, self.faults["cut_mode"])
            self.faults["cut_times"] -= 1
            if self.faults["cut_times"] <= 0:
                self.faults.update(cut_file=None, cut_times=1)
            return cut

    def fault(self, name: str):
        with self.lock:
            return self.faults[name]

    def record(self, entry: dict) -> None:
        with self.lock:
            self.requests.append(entry)

    def reset(self) -> None:
        with self.lock:
            self.faults, self.requests = dict(FAULT_DEFAULTS), []


# --- HTTP ---------------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    app: App
    port_name = ""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log(f"{self.port_name} {format % args}")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        self.entry = {"server": self.port_name, "method": method, "path": url.path, "query": url.query,
                      "file": None, "range": self.headers.get("Range"),
                      "authorization": "Authorization" in self.headers, "status": 0, "bytes": 0}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        try:
            self.route(method, parts, parse_qs(url.query), body)
        except HubError as exc:
            headers = {**exc.headers, "X-Error-Message": str(exc)}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            self._reply(method, exc.status, json.dumps({"error": str(exc)}).encode(), headers)
        except Exception:  # a bug here: say so, rather than drop the connection (the client would retry)
            log(traceback.format_exc())
            if self.entry["status"]:
                self.close_connection = True
            else:
                self._reply(method, 500, json.dumps({"error": "test hub server error"}).encode())
        finally:
            if not self.entry["path"].startswith("/_test/"):
                self.app.record(self.entry)

    def route(self, method: str, parts: list[str], query: dict, body: bytes) -> None:
        raise NotImplementedError

    def _reply(self, method: str, status: int, body: bytes, headers: dict | None = None,
               content_type: str = "application/json") -> None:
        self.send_response(status)
        request_id = self.headers.get("X-Amzn-Trace-Id") or str(uuid.uuid4())
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                           "X-Request-Id": request_id, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)
            self.entry["bytes"] = len(body)
        self.entry["status"] = status

    def _json(self, method: str, data: object) -> None:
        self._reply(method, 200, json.dumps(data).encode())

    def _send_file(self, method: str, content: Path, repo_path: str, headers: dict) -> None:
        """200 or 206 for a single byte range; the next GETs may be cut by the cut_* faults."""
        size = content.stat().st_size
        start, end, status = 0, size - 1, 200
        match = RANGE_RE.fullmatch(self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start, end = int(match.group(1)), min(int(match.group(2) or size - 1), size - 1)
            else:  # bytes=-N: the last N bytes
                start = max(size - int(match.group(2)), 0)
            if start > end:
                raise HubError(416, None, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
            status, headers = 206, {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        self.entry["file"] = repo_path
        self.send_response(status)
        for key, value in {"Content-Type": "application/octet-stream", "Content-Length": str(end - start + 1),
                           "Accept-Ranges": "bytes", **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.entry["status"] = status
        if method == "HEAD":
            return
        cut = self.app.take_cut(repo_path, start)
        remaining = end - start + 1 if cut is None else min(cut[0], end - start + 1)
        with content.open("rb") as f:
            f.seek(start)
            while remaining > 0 and (chunk := f.read(min(CHUNK, remaining))):
                self.wfile.write(chunk)
                remaining -= len(chunk)
                self.entry["bytes"] += len(chunk)
        if cut is not None:
            self._cut(cut[1])

    def _cut(self, mode: str) -> None:
        log(f"fault: cutting {self.entry['path']} after {self.entry['bytes']} bytes ({mode})")
        self.entry["cut"] = mode
        self.wfile.flush()
        self.close_connection = True
        if mode == "reset":  # linger 0 makes the close a RST; closed now, before socketserver's shutdown sends a FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            os.close(self.connection.detach())


class HubHandler(_Handler):
    port_name = "hub"

    def route(self, method: str, parts: list[str], query: dict, body: bytes) -> None:
        if parts[:1] == ["_test"]:
            return self._test_route(method, parts[1:], body)
        if parts == ["api", "agent-harnesses"] and method == "GET":
            return self._json(method, {"standardEnvVars": [], "harnesses": {}})
        if parts[:1] == ["api"] and (answer := self.app.fault("api_answer")) is not None:
            return self._reply(method, int(answer.get("status", 200)), str(answer.get("body", "")).encode(),
                               content_type=answer.get("content_type", "text/html"))
        if parts[:2] == ["api", "models"] and len(parts) >= 3:  # a one-part id ("gpt2") is not a repo here
            return self._api(method, self._repo(parts[2], parts[3] if len(parts) > 3 else ""), parts[4:], query, body)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, self._repo(parts[0], parts[1]), parts[3], "/".join(parts[4:]))
        raise HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _api(self, method: str, repo: HubRepo, rest: list[str], query: dict, body: bytes) -> None:
        if method == "GET" and (not rest or rest[0] == "revision"):
            sha = self._commit(repo, "/".join(rest[1:]) or "main")
            blobs = query.get("blobs", ["false"])[-1].lower() in ("1", "true")
            info = model_info(repo, sha, blobs)
            for sibling in info["siblings"]:
                sibling.update((self.app.fault("sibling_patch") or {}).get(sibling["rfilename"], {}))
            return self._json(method, info)
        if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            files = repo.commit_info(self._commit(repo, rest[1]))["files"]
            recursive = query.get("recursive", ["false"])[-1].lower() in ("1", "true")
            try:
                return self._json(method, tree_entries(files, "/".join(rest[2:]), recursive))
            except KeyError:
                raise HubError(404, "EntryNotFound", f"{'/'.join(rest[2:])} does not exist") from None
        if method == "POST" and rest[:1] == ["paths-info"] and len(rest) >= 2:
            files = repo.commit_info(self._commit(repo, "/".join(rest[1:])))["files"]
            wanted = parse_qs(body.decode()).get("paths", [])
            folders = [p.strip("/") for p in wanted if any(f.startswith(p.strip("/") + "/") for f in files)]
            return self._json(method, [file_entry(p, files[p]) for p in wanted if p in files]
                              + [dir_entry(p, files) for p in folders])
        if method == "GET" and rest == ["refs"]:
            return self._json(method, refs(repo))
        raise HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _resolve(self, method: str, repo: HubRepo, revision: str, path: str) -> None:
        state = repo.state()
        if state["gated"] and self._token() not in state["tokens"]:
            anonymous = self._token() is None
            message = (f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                       "authenticated to access it. Please log in." if anonymous else
                       f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                       f"Visit {self._base_url()}/{repo.repo_id} to ask for access.")
            raise HubError(401 if anonymous else 403, "GatedRepo", message)
        sha = self._commit(repo, revision)
        entry = repo.commit_info(sha)["files"].get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        self.entry["file"] = path
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'}
        if not entry["lfs"]:
            return self._send_file(method, repo.content_path(entry), path, headers)
        sha256 = entry["lfs"]["oid"]
        location = f"{self.app.lfs_url}/lfs/{repo.repo_id}/{sha256}?filename={quote(path, safe='')}"
        self._reply(method, 302, b"", {**headers, "X-Linked-Etag": f'"{sha256}"',
                                       "X-Linked-Size": str(entry["lfs"]["size"]), "Location": location},
                    content_type="text/plain; charset=utf-8")

    def _repo(self, org: str, name: str) -> HubRepo:
        try:
            repo = self.app.hub.repo(f"{org}/{name}")
        except ValueError:
            repo = None
        if repo is None or not repo.exists():
            # The Hub answers 401 to an anonymous client, so as not to tell which private repos exist.
            status = 404 if "Authorization" in self.headers else 401
            raise HubError(status, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: HubRepo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _test_route(self, method: str, parts: list[str], body: bytes) -> None:
        if parts == ["faults"] and method == "POST":
            return self._json(method, self.app.set_faults(json.loads(body or b"{}")))
        if parts == ["requests"] and method == "GET":
            with self.app.lock:
                requests = list(self.app.requests)
            return self._json(method, requests)
        if parts == ["reset"] and method == "POST":
            self.app.reset()
            return self._json(method, {})
        raise HubError(404, None, "no such test route")


class LfsHandler(_Handler):
    """The LFS storage (the CDN of the real Hub): /lfs/{org}/{name}/{sha256}, no authorization asked."""

    port_name = "lfs"

    def route(self, method: str, parts: list[str], query: dict, body: bytes) -> None:
        if len(parts) == 4 and parts[0] == "lfs" and method in ("GET", "HEAD"):
            with contextlib.suppress(ValueError):
                content = self.app.hub.repo(f"{parts[1]}/{parts[2]}").lfs_object(parts[3])
                if content is not None:
                    filename = query.get("filename", [parts[3]])[-1]
                    name = quote(filename.rsplit("/", 1)[-1])
                    headers = {"ETag": f'"{parts[3]}"',
                               "Content-Disposition": f"inline; filename*=UTF-8''{name}; filename=\"{name}\";"}
                    return self._send_file(method, content, filename, headers)
        raise HubError(404, None, "NoSuchKey")


def serve(host: str, port: int, root: Path) -> None:
    app = App(LocalHub(root))
    lfs_httpd = ThreadingHTTPServer((host, 0), type("BoundLfs", (LfsHandler,), {"app": app}))
    lfs_httpd.daemon_threads = True
    app.lfs_url = f"http://{host}:{lfs_httpd.server_address[1]}"
    threading.Thread(target=lfs_httpd.serve_forever, daemon=True).start()
    log(f"LFS storage on {app.lfs_url}")
    announce_and_serve(ThreadingHTTPServer((host, port), type("BoundHub", (HubHandler,), {"app": app})))


def main(argv: list[str] | None = None) -> None:
    parser = server_arguments("tests.hub_server", __doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the repos, ROOT/<org>/<name>/ (tests/hub_repos.py)")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    serve(args.host, args.port, args.root)


# --- starting the server from tests -------------------------------------------------------------------------

class HubTestServer(ServerProcess):
    """One server process: HubTestServer(root).start() -> url; .hub publishes repos (`LocalHub`); .faults(...);
    .requests(); .fetched(); .reset(); .stop()."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1"):
        self.root = Path(root)
        self.hub = LocalHub(self.root)
        super().__init__(["tests.hub_server", "--port", "0", "--host", host, "--root", str(self.root)],
                         self.root)

    def start(self, timeout: float = 30) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        return super().start(timeout)

    def faults(self, **faults) -> dict:
        """e.g. faults(cut_file="model.safetensors", cut_after_bytes=4096); faults(reset=True)."""
        return self._call("POST", "/_test/faults", json=faults)

    def requests(self, **match) -> list[dict]:
        """The request log, oldest first, keeping the entries whose fields equal `match` (e.g. method="GET")."""
        return [r for r in self._call("GET", "/_test/requests") if all(r.get(k) == v for k, v in match.items())]

    def fetched(self) -> list[str]:
        """The repo files whose content was sent (a GET answered 200 or 206, from either port), sorted."""
        return sorted({r["file"] for r in self.requests(method="GET") if r["file"] and r["status"] in (200, 206)})

    def reset(self) -> None:
        """Clear the request log and the faults."""
        self._call("POST", "/_test/reset")

    def _call(self, method: str, path: str, **kwargs) -> object:
        import httpx

        from so8t_deploy.external.ollama_host import tls_context

        return httpx.request(method, self.url + path, timeout=10, verify=tls_context(),
                             **kwargs).raise_for_status().json()


if __name__ == "__main__":
    main()
