"""POST /api/pull in the Ollama test server (tests/ollama_server/pull.py) against a real registry
(tests/registry.py: Debian's docker-registry), and the byte-counting proxy (tests/idle_proxy.py).

Images are pushed with plain HTTP as the registry's API has it. Most use a random "model" layer (a pull does not
read it); the test that runs the pulled model pushes the tiny Phi-3 GGUF.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import ollama
import pytest

from tests.gotemplate.gofmt import go_json
from tests.idle_proxy import CountingProxy
from tests.ollama_server import OllamaTestServer
from tests.ollama_server.ggufinfo import human_number, read_gguf
from tests.registry import MANIFEST_MEDIA, TEST_AUTH, Registry, sha256_digest
from tests.test_ollama_server import PHI3_STOPS, PHI3_TEMPLATE, TURNS, create, tiny_gguf  # noqa: F401

TIMEOUT = 60
MEDIA = "application/vnd.ollama.image."
PARAMS = {"stop": PHI3_STOPS, "temperature": 0.7, "num_ctx": 512}
MODEL_BYTES = os.urandom(256 * 1024)


def config_blob(family: str = "phi3", model_type: str = "3.7M", file_type: str = "F16") -> bytes:
    """model.ConfigV2 as Ollama writes it for a GGUF model."""
    config = {"model_format": "gguf", "model_family": family, "model_families": [family], "model_type": model_type,
              "file_type": file_type, "architecture": "amd64", "os": "linux"}
    return (go_json(config, sort_keys=False) + "\n").encode()


def image_layers(model: bytes = MODEL_BYTES, template: str = PHI3_TEMPLATE) -> list[tuple[str, bytes]]:
    return [(MEDIA + "model", model), (MEDIA + "template", template.encode()),
            (MEDIA + "params", (go_json(PARAMS) + "\n").encode())]


def push(registry: Registry, repo: str = "ns/tiny", tag: str = "v1", **layers) -> tuple[str, bytes, list[bytes]]:
    """Push an image; returns (manifest digest, manifest bytes, every blob: layers then config)."""
    entries, config = image_layers(**layers), config_blob()
    digest, manifest = registry.push_image(repo, tag, entries, config)
    return digest, manifest, [data for _, data in entries] + [config]


def pull(url: str, model: str, *, insecure: bool = True, stream: bool = True) -> httpx.Response:
    return httpx.post(f"{url}/api/pull", json={"model": model, "insecure": insecure, "stream": stream},
                      timeout=TIMEOUT)


def lines(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines() if line]


def statuses(objs: list[dict]) -> list[str]:
    """The status lines, with the per-blob progress lines (timing-dependent for downloads) left out."""
    return [o.get("status", "ERROR: " + o.get("error", "")) for o in objs
            if not o.get("status", "").startswith("pulling ") or o["status"] == "pulling manifest"]


def tags(url: str) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.get(f"{url}/api/tags", timeout=TIMEOUT).json()["models"]}


def blob_names(server: OllamaTestServer) -> set[str]:
    return {p.name for p in (server.data_dir / "blobs").iterdir()}


def blob_name(data: bytes) -> str:
    return "sha256-" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def host(pool) -> OllamaTestServer:
    """A fresh Ollama test server (its own store) for the test."""
    return pool.server(pool.start(1)[0])


# --- a pull -----------------------------------------------------------------------------------------------

def test_pull_writes_the_registry_manifest_as_fetched(registry, host):
    digest, manifest, blobs = push(registry)
    name = f"{registry.host}/ns/tiny:v1"
    objs = lines(pull(host.url, name))
    assert statuses(objs) == ["pulling manifest", "verifying sha256 digest", "writing manifest", "success"]
    for obj in objs:  # progress lines of a download, if one took more than 60 ms: digest, total, completed
        if obj["status"].startswith("pulling ") and obj["status"] != "pulling manifest":
            assert obj["status"] == f"pulling {obj['digest'][7:19]}" and obj["total"] in map(len, blobs)

    # The manifest is stored as the registry's bytes: the /api/tags digest is the registry's manifest digest.
    entry = tags(host.url)[name]
    assert "sha256:" + entry["digest"] == digest == sha256_digest(manifest)
    path = host.data_dir / "manifests" / registry.host / "ns" / "tiny" / "v1"
    assert path.read_bytes() == manifest
    assert entry["size"] == sum(map(len, blobs))
    assert entry["details"]["family"] == "phi3" and entry["details"]["quantization_level"] == "F16"
    assert blob_names(host) == {blob_name(b) for b in blobs}  # no partial files left
    stats = host.stats()
    assert (stats["pulls"], stats["pulls_failed"], stats["bytes_pulled"]) == (1, 0, sum(map(len, blobs)))

    # A copy is byte for byte: same digest. The pulled model shows like a created one.
    assert httpx.post(f"{host.url}/api/copy", json={"source": name, "destination": "tiny:v1-candidate"}).is_success
    assert tags(host.url)["tiny:v1-candidate"]["digest"] == entry["digest"]
    show = httpx.post(f"{host.url}/api/show", json={"model": name}, timeout=TIMEOUT)
    assert show.status_code == 500  # the random "model" layer is no GGUF: GetModel fails to read it
    r = pull(host.url, name, stream=False)  # "stream": false answers the last line
    assert r.status_code == 200 and r.json() == {"status": "success"}


@pytest.mark.llamacpp
def test_a_pulled_model_runs_like_the_created_one(registry, host, tiny_gguf):  # noqa: F811 - the fixture
    """The pulled image of a GGUF with TEMPLATE and PARAMETERs shows, renders and generates as the same model
    created on the host."""
    gguf = tiny_gguf.read_bytes()
    info = read_gguf(tiny_gguf)
    entries = image_layers(model=gguf)
    config = config_blob(info.architecture, human_number(info.parameter_count), info.file_type)
    registry.push_image("ns/phi", "v1", entries, config)
    pulled = f"{registry.host}/ns/phi:v1"
    assert statuses(lines(pull(host.url, pulled)))[-1] == "success"
    client = ollama.Client(host=host.url, timeout=TIMEOUT)
    create(client, host.url, tiny_gguf, "created:v1", template=PHI3_TEMPLATE, parameters=PARAMS)

    def show(model: str) -> dict:
        out = httpx.post(f"{host.url}/api/show", json={"model": model}, timeout=TIMEOUT).json()
        out["parameters"] = sorted(out["parameters"].splitlines())  # Go's random map order
        return {k: out[k] for k in ("template", "parameters", "details", "model_info", "capabilities")}

    assert show(pulled) == show("created:v1")
    a, b = (tags(host.url)[m] for m in (pulled, "created:v1"))
    assert a["details"] == b["details"] and a["capabilities"] == b["capabilities"]

    def render(model: str) -> str:
        r = httpx.post(f"{host.url}/api/chat", json={"model": model, "messages": TURNS, "stream": False,
                                                     "_debug_render_only": True}, timeout=TIMEOUT)
        return r.json()["_debug_info"]["rendered_template"]

    assert render(pulled) == render("created:v1")
    options = {"num_predict": 6, "seed": 3, "top_k": 1}
    outputs = [client.generate(model=m, prompt="Say hello.", options=options) for m in (pulled, "created:v1")]
    assert outputs[0].response == outputs[1].response and outputs[0].eval_count > 0


def test_repull_fetches_no_blob_and_the_proxy_counts_the_bytes(registry, host):
    """A second pull of a stored model reads the manifest and no blob: each blob is one `pulling` line with
    completed = total. A CountingProxy in front of the registry sees what crosses."""
    _, manifest, blobs = push(registry)
    proxy = CountingProxy(int(registry.url.rsplit(":", 1)[1]))
    try:
        name = f"{proxy.url.removeprefix('http://')}/ns/tiny:v1"
        assert statuses(lines(pull(host.url, name)))[-1] == "success"
        sent, received = proxy.counts()
        # The blob bytes, at least: the GET for the direct URL (whose body Ollama never reads) may add a copy.
        assert received >= sum(map(len, blobs)) + len(manifest) and sent > 0
        before = host.stats()["bytes_pulled"]
        proxy.reset_counts()

        objs = lines(pull(host.url, name))
        assert host.stats()["bytes_pulled"] == before
        progress = [o for o in objs if o["status"].startswith("pulling ") and o["status"] != "pulling manifest"]
        assert [(o["digest"], o["total"], o["completed"]) for o in progress] == \
            [(sha256_digest(b), len(b), len(b)) for b in blobs]
        assert statuses(objs) == ["pulling manifest", "verifying sha256 digest", "writing manifest", "success"]
        sent, received = proxy.counts()
        assert len(manifest) < received < len(manifest) + 4096 and 0 < sent < 4096
    finally:
        proxy.close()


def test_pulling_a_new_version_removes_the_layers_only_the_old_one_used(registry, host):
    _, _, old_blobs = push(registry)
    name = f"{registry.host}/ns/tiny:v1"
    assert statuses(lines(pull(host.url, name)))[-1] == "success"
    digest, _, new_blobs = push(registry, template="{{ .Prompt }}")  # same model layer, new template
    objs = lines(pull(host.url, name))
    assert statuses(objs) == ["pulling manifest", "verifying sha256 digest", "writing manifest",
                              "removing unused layers", "success"]
    assert blob_names(host) == {blob_name(b) for b in new_blobs}  # the old template blob is gone
    assert blob_name(old_blobs[1]) not in blob_names(host)
    assert "sha256:" + tags(host.url)[name]["digest"] == digest


# --- failures ---------------------------------------------------------------------------------------------

def test_errors_before_and_after_the_first_line(registry, host):
    push(registry)
    # insecure false: https, against a plain-HTTP registry (Go's http.ErrSchemeMismatch).
    https_error = (f'pull model manifest: Get "https://{registry.host}/v2/ns/tiny/manifests/v1": '
                   "http: server gave HTTP response to HTTPS client")
    assert lines(pull(host.url, f"{registry.host}/ns/tiny:v1", insecure=False)) == \
        [{"status": "pulling manifest"}, {"error": https_error}]
    r = pull(host.url, f"{registry.host}/ns/tiny:v1", insecure=False, stream=False)
    assert r.status_code == 500 and r.json() == {"error": https_error}

    missing = lines(pull(host.url, f"{registry.host}/ns/tiny:nope"))
    assert missing == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]

    for model, error in (("", "invalid model name"), ("a/b/c/d/e", "invalid model name")):
        r = pull(host.url, model)
        assert r.status_code == 400 and r.json() == {"error": error}
    r = httpx.post(f"{host.url}/api/pull", json={"model": "x", "insecure": "yes"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "PullRequest.insecure" in r.json()["error"]

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    refused = lines(pull(host.url, f"127.0.0.1:{port}/ns/tiny:v1"))
    assert refused[-1] == {"error": f'pull model manifest: Get "http://127.0.0.1:{port}/v2/ns/tiny/manifests/v1": '
                                    f"dial tcp 127.0.0.1:{port}: connect: connection refused"}
    assert tags(host.url) == {}
    stats = host.stats()
    assert (stats["pulls"], stats["pulls_failed"]) == (0, 4)


def test_a_registry_without_the_location_header_fails(make_registry, host):
    """ollama#7244: distribution answers a blob GET 200 without Location unless configured to add one."""
    registry = make_registry(location_header=False)
    push(registry)
    objs = lines(pull(host.url, f"{registry.host}/ns/tiny:v1"))
    assert statuses(objs) == ["pulling manifest", "ERROR: http: no Location header in response"]
    assert host.stats()["bytes_pulled"] == 0 and tags(host.url) == {}


def test_an_interrupted_download_resumes_from_its_partial(registry, host):
    _, _, blobs = push(registry)
    name, model_blob = f"{registry.host}/ns/tiny:v1", blob_name(blobs[0])
    host.faults(fail_pull_after_bytes=10_000)
    objs = lines(pull(host.url, name))
    assert statuses(objs) == ["pulling manifest", "ERROR: max retries exceeded: unexpected EOF"]
    partial = host.data_dir / "blobs" / (model_blob + "-partial")
    assert partial.stat().st_size == len(blobs[0])  # sparse, at its full size
    assert partial.read_bytes()[:10_000] == blobs[0][:10_000]
    assert json.loads((partial.parent / (model_blob + "-partial-0")).read_text()) == \
        {"N": 0, "Offset": 0, "Size": len(blobs[0]), "Completed": 10_000}
    stats = host.stats()
    assert (stats["pulls_failed"], stats["bytes_pulled"]) == (1, 10_000)
    assert host.faults()["fail_pull_after_bytes"] is None  # used up

    assert statuses(lines(pull(host.url, name)))[-1] == "success"
    assert host.stats()["bytes_pulled"] == sum(map(len, blobs))  # the rest, not the blob again
    assert (host.data_dir / "blobs" / model_blob).read_bytes() == blobs[0]
    assert blob_names(host) == {blob_name(b) for b in blobs}


def test_the_pull_fault_can_aim_at_one_model_and_repeat(registry, host):
    push(registry, tag="v1")
    _, _, blobs = push(registry, tag="v2", model=os.urandom(64 * 1024))
    partial_part = host.data_dir / "blobs" / (blob_name(blobs[0]) + "-partial-0")
    host.faults(fail_pull_after_bytes=1000, fail_pull_times=2, fail_pull_model="tiny:V2")
    assert statuses(lines(pull(host.url, f"{registry.host}/ns/tiny:v1")))[-1] == "success"  # not aimed at
    for completed in (1000, 2000):  # each failing pull resumes the partial and adds its 1000 bytes
        objs = lines(pull(host.url, f"{registry.host}/ns/tiny:v2"))
        assert objs[-1] == {"error": "max retries exceeded: unexpected EOF"}
        assert json.loads(partial_part.read_text())["Completed"] == completed
    assert host.faults()["fail_pull_model"] is None  # used up: the faults are back to their defaults
    assert statuses(lines(pull(host.url, f"{registry.host}/ns/tiny:v2")))[-1] == "success"
    assert not partial_part.exists()


def test_a_corrupted_registry_blob_fails_the_digest_check(registry, host):
    _, _, blobs = push(registry)
    stored = registry.blob_file(sha256_digest(blobs[0]))
    corrupted = bytes([blobs[0][0] ^ 1]) + blobs[0][1:]
    stored.write_bytes(corrupted)
    objs = lines(pull(host.url, f"{registry.host}/ns/tiny:v1"))
    assert statuses(objs) == [
        "pulling manifest", "verifying sha256 digest",
        f"ERROR: digest mismatch, file must be downloaded again: want {sha256_digest(blobs[0])}, "
        f"got {sha256_digest(corrupted)}"]
    assert blob_name(blobs[0]) not in blob_names(host) and tags(host.url) == {}


def test_ollama_cannot_pull_from_a_registry_with_basic_auth(auth_registry, host):
    """PullHandler sends no credentials; on a 401 Ollama asks the challenge's realm for a token, and a basic
    realm is no URL on the registry's host."""
    assert auth_registry.auth == TEST_AUTH
    assert httpx.get(f"{auth_registry.url}/v2/").status_code == 401
    push(auth_registry)  # the push helpers authenticate
    objs = lines(pull(host.url, f"{auth_registry.host}/ns/tiny:v1"))
    assert objs[-1] == {"error": f'pull model manifest: realm host "" does not match original host '
                                 f'"{auth_registry.host}"'}


# --- a client that goes away -----------------------------------------------------------------------------

class StallingRegistry:
    """Just enough registry for one blob: the manifest, HEAD, the direct-URL GET (200, `Location: ?`), and
    ranged GETs that send `stall_after` bytes and then wait until `release` is set. Records every Range."""

    def __init__(self, blob: bytes, stall_after: int):
        self.blob, self.stall_after, self.release, self.ranges = blob, stall_after, threading.Event(), []
        self.digest = sha256_digest(blob)
        self.manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA, "config": {},
                                    "layers": [{"mediaType": MEDIA + "model", "digest": self.digest,
                                                "size": len(blob)}]}).encode()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(head=True)

            def do_GET(self) -> None:
                self.answer(head=False)

            def answer(self, head: bool) -> None:
                if self.path.endswith("/manifests/v1"):
                    return self.send(200, outer.manifest, head)
                if not self.path.split("?")[0].endswith(outer.digest):
                    return self.send(404, b"{}", head)
                if head or "Range" not in self.headers:
                    return self.send(200, outer.blob, head, location=True)
                start, stop = map(int, self.headers["Range"].removeprefix("bytes=").split("-"))
                outer.ranges.append((start, stop))
                body = outer.blob[start:stop + 1]
                self.send_response(206)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = max(0, outer.stall_after - start)
                self.wfile.write(body[:cut])
                self.wfile.flush()
                if cut < len(body):
                    outer.release.wait(30)
                    self.wfile.write(body[cut:])

            def send(self, status: int, body: bytes, head: bool, location: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if location:
                    self.send_header("Location", "?")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_client_that_goes_away_cancels_the_pull_and_keeps_the_partial(host):
    blob = os.urandom(200_000)
    fake = StallingRegistry(blob, stall_after=50_000)
    try:
        name = f"{fake.host}/ns/stall:v1"
        parts = urlsplit(host.url)
        with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
            body = json.dumps({"model": name, "insecure": True}).encode()
            sock.sendall(b"POST /api/pull HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            seen = b""
            deadline = time.monotonic() + 20
            while b'"completed":50000' not in seen and time.monotonic() < deadline:
                seen += sock.recv(65536)  # progress lines every 60 ms while the download waits
            assert b'"completed":50000' in seen
        part = host.data_dir / "blobs" / (blob_name(blob) + "-partial-0")

        def cancelled() -> bool:
            return host.stats()["pulls_failed"] == 1 and json.loads(part.read_text())["Completed"] == 50_000

        deadline = time.monotonic() + 15
        while not cancelled():
            assert time.monotonic() < deadline, "the pull was not cancelled"
            time.sleep(0.05)
        fake.release.set()
        assert statuses(lines(pull(host.url, name)))[-1] == "success"
        assert fake.ranges == [(0, len(blob) - 1), (50_000, len(blob) - 1)]  # resumed where it stopped
        assert (host.data_dir / "blobs" / blob_name(blob)).read_bytes() == blob
        assert host.stats()["bytes_pulled"] == len(blob)
    finally:
        fake.close()


def test_counting_proxy_counts_both_directions():
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        def echo() -> None:
            conn, _ = upstream.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data * 2)

        threading.Thread(target=echo, daemon=True).start()
        proxy = CountingProxy(upstream.getsockname()[1])
        try:
            parts = urlsplit(proxy.url)
            with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
                sock.sendall(b"x" * 1000)
                got = b""
                while len(got) < 2000:
                    got += sock.recv(65536)
            assert proxy.counts() == (1000, 2000) and proxy.cuts == 0 and proxy.connections == 1
        finally:
            proxy.close()


def test_the_fixture_registry_is_a_real_one(registry, tmp_path):
    """What the product relies on: pushes with digests, manifests by tag, `Location: ?` on blob GETs, its own
    log in a file, and stop() ending its process."""
    digest, manifest, blobs = push(registry)
    r = httpx.get(f"{registry.url}/v2/ns/tiny/manifests/v1", headers={"Accept": MANIFEST_MEDIA})
    assert r.content == manifest and r.headers["docker-content-digest"] == digest
    blob = httpx.get(f"{registry.url}/v2/ns/tiny/blobs/{sha256_digest(blobs[0])}")
    assert blob.content == blobs[0] and blob.headers["location"] == "?"
    assert registry.blob_file(sha256_digest(blobs[0])).read_bytes() == blobs[0]
    assert registry.log_path.is_file() and Path(registry.config_path).is_file()
    proc = registry.proc
    registry.stop()
    assert proc.poll() is not None and registry.proc is None
