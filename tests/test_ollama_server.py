"""Tests of the Ollama-compatible test server (tests/ollama_server), through the official client and raw HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import ollama
import pytest

from tests.gotemplate import GoTemplates, GoToolchainMissing, TemplateError, binary_path, ensure_binary
from tests.gotemplate.gofmt import go_json, plain_v, sharp_v
from tests.ollama_server import REPO, OllamaTestServer, ServerPool
from tests.ollama_server.generation import DEFAULT_OPTIONS, Options
from tests.ollama_server.names import ModelName, parse_keep_alive

PHI3_TEMPLATE = """{{ if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}{{ if .Prompt }}<|user|>
{{ .Prompt }}<|end|>
{{ end }}<|assistant|>
{{ .Response }}<|end|>
"""
MESSAGES_TEMPLATE = """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""
PHI3_STOPS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
TURNS = [{"role": "system", "content": "S"}, {"role": "user", "content": "A"},
         {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]
TURNS_PROMPT = "<|system|>\nS<|end|>\n<|user|>\nA<|end|>\n<|assistant|>\nB<|end|>\n<|user|>\nC<|end|>\n<|assistant|>\n"
TIMEOUT = 30


# --- fixtures (reusable: the main developer may move them to conftest.py) -------------------------------

@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Phi-3 converted to an F16 GGUF (about 5 s, once per session)."""
    from so8t_deploy.build.provenance import bake_output_metadata
    from so8t_deploy.external.llamacpp import convert_to_gguf, locate_converter
    from so8t_deploy.tiny_models import write_tiny_model

    tmp = tmp_path_factory.mktemp("tiny-gguf")
    model = write_tiny_model(tmp / "model", "phi3", hidden_size=64)
    out = tmp / "model-f16.gguf"
    convert_to_gguf(locate_converter(), model, out, "f16", metadata=bake_output_metadata(model))
    return out


@pytest.fixture(scope="module")
def unknown_arch_gguf(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny GGUF with general.architecture "xyz3": Ollama's decoder reads it, llama.cpp refuses it."""
    data = tiny_gguf.read_bytes()
    key = b"general.architecture\x08\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00phi3"
    assert data.count(key) == 1
    out = tmp_path_factory.mktemp("bad-gguf") / "xyz3.gguf"
    out.write_bytes(data.replace(key, key[:-4] + b"xyz3"))
    return out


@pytest.fixture(scope="session")
def ollama_pool(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("ollama"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def ollama_hosts(ollama_pool):
    """A factory: ollama_hosts(n) starts n fresh servers and returns their base URLs."""
    return ollama_pool.start


@pytest.fixture(scope="session")
def shared_url(ollama_hosts) -> str:
    return ollama_hosts(1)[0]


@pytest.fixture
def server(shared_url, ollama_pool) -> OllamaTestServer:
    """The shared server, with no faults set before and after the test."""
    server = ollama_pool.server(shared_url)
    server.faults(reset=True)
    yield server
    server.faults(reset=True)


@pytest.fixture
def url(server) -> str:
    return server.url


@pytest.fixture
def client(url) -> ollama.Client:
    return ollama.Client(host=url, timeout=TIMEOUT)


@pytest.fixture(scope="session")
def go_templates():
    templates = GoTemplates()
    yield templates
    templates.close()


# --- helpers -------------------------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def upload(url: str, path: Path) -> str:
    """HEAD, then POST only when missing (a deleted model takes its blob with it)."""
    data = path.read_bytes()
    digest = sha256(data)
    if httpx.head(f"{url}/api/blobs/{digest}", timeout=TIMEOUT).status_code == 404:
        httpx.post(f"{url}/api/blobs/{digest}", content=data, timeout=TIMEOUT).raise_for_status()
    return digest


def create(client: ollama.Client, url: str, gguf: Path, name: str, **kwargs):
    kwargs.setdefault("template", PHI3_TEMPLATE)
    kwargs.setdefault("parameters", {"stop": PHI3_STOPS, "temperature": 0.7, "num_ctx": 512})
    return client.create(model=name, files={"model.gguf": upload(url, gguf)}, stream=False, **kwargs)


def create_lines(url: str, body: dict) -> list[tuple[float, dict]]:
    """A streamed create as (arrival time, object) pairs."""
    lines = []
    with httpx.stream("POST", f"{url}/api/create", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        for line in r.iter_lines():
            if line:
                lines.append((time.monotonic(), json.loads(line)))
    return lines


def statuses(lines: list[tuple[float, dict]]) -> list[str]:
    return [obj.get("status", "ERROR: " + obj.get("error", "")) for _, obj in lines]


def tag_entry(client: ollama.Client, name: str):
    return next((m for m in client.list().models if m.model == name), None)


def ndjson(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def manifest_file(server: OllamaTestServer, name: str) -> Path:
    model, tag = name.split(":")
    return server.data_dir / "manifests" / "registry.ollama.ai" / "library" / model / tag


def wait_for(condition, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def raw_request(url: str, body: dict) -> socket.socket:
    """Send POST /api/create on a bare socket, so that a test decides exactly when the client goes away."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /api/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


# --- version, blobs ------------------------------------------------------------------------------------

def test_version_old_server_and_source_build(url, server):
    assert httpx.get(f"{url}/api/version").json() == {"version": "0.32.15"}
    server.faults(version="0.5.4")
    assert httpx.get(f"{url}/api/version").json() == {"version": "0.5.4"}
    r = httpx.post(f"{url}/api/create", json={"model": "x", "files": {"model.gguf": "sha256:" + "0" * 64}})
    assert r.status_code == 400 and r.json() == {"error": "path or Modelfile are required"}
    server.faults(version="0.0.0")  # what a source build reports; it is current code all the same
    assert httpx.get(f"{url}/api/version").json() == {"version": "0.0.0"}
    r = httpx.post(f"{url}/api/create", json={"model": "x", "files": {"model.gguf": "sha256:" + "0" * 64}})
    assert r.status_code == 200 and ndjson(r)[0] == {"status": "parsing GGUF"}


def test_blob_lifecycle(url, server):
    data = os.urandom(300_000)
    digest = sha256(data)
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        assert http.head(f"/api/blobs/{digest}").status_code == 404
        assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
        assert http.head(f"/api/blobs/{digest}").status_code == 200
        before = server.stats()
        again = http.post(f"/api/blobs/{digest}", content=data)
        assert again.status_code == 200 and again.headers["connection"] == "close"
        assert server.stats() == before  # zero bytes read for a blob that is already there
        assert http.get("/api/version").status_code == 200  # the client reconnects fine

        # Like Ollama, a mismatching body is kept under the digest it really has.
        other = os.urandom(1000)
        mismatch = http.post(f"/api/blobs/{sha256(data[:10])}", content=other)
        assert mismatch.status_code == 400
        assert mismatch.json() == {"error": f'digest mismatch, expected "{sha256(data[:10])}", got "{sha256(other)}"'}
        assert http.head(f"/api/blobs/{sha256(data[:10])}").status_code == 404
        assert http.head(f"/api/blobs/{sha256(other)}").status_code == 200
        assert http.post("/api/blobs/sha256:abc", content=other).json() == {"error": "invalid digest format"}
        assert http.head("/api/blobs/md5:abc").status_code == 400
    assert not any((server.data_dir / "tmp").iterdir())


def test_blob_chunked_upload_and_client_create_blob(url, client, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = sha256(data)
    pieces = (data[i:i + 700_000] for i in range(0, len(data), 700_000))
    r = httpx.post(f"{url}/api/blobs/{digest}", content=pieces, timeout=TIMEOUT)  # a generator: chunked
    assert r.status_code == 201
    path = tmp_path / "blob.bin"
    path.write_bytes(data[::-1])
    assert client.create_blob(path) == sha256(data[::-1])
    assert httpx.head(f"{url}/api/blobs/{sha256(data[::-1])}").status_code == 200


def test_cut_uploads_leave_no_blob(url, server):
    data = os.urandom(400_000)
    digest = sha256(data)
    received = server.stats()["bytes_received"]
    server.faults(cut_upload_after_bytes=100_000, cut_upload_times=2)
    for _ in range(2):
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{url}/api/blobs/{digest}", content=data, timeout=TIMEOUT)
        assert httpx.head(f"{url}/api/blobs/{digest}").status_code == 404
    assert server.stats()["bytes_received"] == received + 200_000

    # The client goes away in the middle of its body.
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        sock.sendall(data[:50_000])
    wait_for(lambda: not any((server.data_dir / "tmp").iterdir()), 10, "the partial upload to go")
    assert httpx.head(f"{url}/api/blobs/{digest}").status_code == 404

    # The fault is spent.
    assert httpx.post(f"{url}/api/blobs/{digest}", content=data, timeout=TIMEOUT).status_code == 201


# --- create: the rewrite, the manifest digest ---------------------------------------------------------

def test_create_rewrites_the_gguf_into_a_new_layer(url, server, tiny_gguf):
    uploaded = upload(url, tiny_gguf)
    lines = create_lines(url, {"model": "t-rewrite:v1", "files": {"model.gguf": uploaded},
                               "template": PHI3_TEMPLATE, "system": "Be brief.", "parameters": {"num_ctx": 512}})
    seen = statuses(lines)
    assert seen[0] == "parsing GGUF"
    progress = [obj for _, obj in lines if obj["status"] == "validating GGUF model"]
    size = tiny_gguf.stat().st_size
    assert seen[1:1 + len(progress)] == ["validating GGUF model"] * len(progress) and len(progress) >= 2
    assert all(p["digest"] == "0000000000000000000" and p["total"] == size for p in progress)
    assert [p["completed"] for p in progress] == sorted(p["completed"] for p in progress)
    assert 0 < progress[-1]["completed"] <= size
    rest = seen[1 + len(progress):]
    assert rest[0] == "verifying conversion" and rest[-2:] == ["writing manifest", "success"]
    layer_lines = rest[1:-2]
    assert len(layer_lines) == 4  # the model, template, system and params layers
    assert all(re.fullmatch(r"(creating new|using existing) layer sha256:[0-9a-f]{64}", s) for s in layer_lines)

    manifest = json.loads(manifest_file(server, "t-rewrite:v1").read_text())
    model_layer = manifest["layers"][0]
    assert model_layer["mediaType"] == "application/vnd.ollama.image.model"
    assert model_layer["digest"] != uploaded and layer_lines[0].endswith(model_layer["digest"])
    assert uploaded not in json.dumps(manifest)  # the upload is no longer any layer...
    assert httpx.head(f"{url}/api/blobs/{uploaded}").status_code == 200  # ...but stays until a restart prunes it
    show = httpx.post(f"{url}/api/show", json={"model": "t-rewrite:v1"}).json()
    blob = server.data_dir / "blobs" / model_layer["digest"].replace(":", "-")
    assert show["modelfile"].splitlines()[4] == f"FROM {blob}"
    assert show["model_info"]["general.architecture"] == "phi3" and show["details"]["quantization_level"] == "F16"


def test_the_same_inputs_give_the_same_manifest_digest(url, client, server, tiny_gguf):
    create(client, url, tiny_gguf, "t-digest", system="Be brief.")
    first = tag_entry(client, "t-digest:latest")
    path = manifest_file(server, "t-digest:latest")
    manifest = path.read_text()
    # What Ollama hashes: the manifest file, which holds layer and config digests and sizes, and nothing else
    # (no name, no time, not the uploaded file's name).
    assert first.digest == hashlib.sha256(manifest.encode()).hexdigest() and manifest.endswith("}\n")
    assert set(json.loads(manifest)) == {"schemaVersion", "mediaType", "config", "layers"}
    assert "t-digest" not in manifest and "model.gguf" not in manifest

    time.sleep(0.01)
    lines = create_lines(url, {"model": "t-digest", "files": {"other-name.gguf": upload(url, tiny_gguf)},
                               "template": PHI3_TEMPLATE, "system": "Be brief.",
                               "parameters": {"num_ctx": 512, "temperature": 0.7, "stop": PHI3_STOPS}})
    assert all(s.startswith("using existing layer") for s in statuses(lines) if "layer" in s)
    again = tag_entry(client, "t-digest:latest")
    assert again.digest == first.digest and again.modified_at > first.modified_at

    client.copy("t-digest", "t-digest-copy")
    assert tag_entry(client, "t-digest-copy:latest").digest == first.digest
    create(client, url, tiny_gguf, "t-digest", system="Be verbose.")
    assert tag_entry(client, "t-digest:latest").digest != first.digest


def test_create_tags_show(url, client, tiny_gguf):
    parameters = {"stop": ["<|end|>", "a\x1bb"], "temperature": 0.7, "num_ctx": 1048576, "num_predict": 4096,
                  "use_mmap": True}
    assert create(client, url, tiny_gguf, "t-show", system="Be brief.", parameters=parameters,
                  license=["MIT", "text\nwith lines"],
                  messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
                  ).status == "success"
    entry = tag_entry(client, "t-show:latest")
    assert entry is not None and entry.size > tiny_gguf.stat().st_size
    assert entry.details.format == "gguf" and entry.details.family == "phi3" and entry.details.families == ["phi3"]
    assert entry.details.quantization_level == "F16" and entry.details.parameter_size.endswith("K")

    show = httpx.post(f"{url}/api/show", json={"model": "t-show"}).json()
    assert show["model_info"]["general.architecture"] == "phi3"
    assert any(key.startswith("so8t.") for key in show["model_info"])
    assert show["model_info"]["tokenizer.ggml.tokens"] is None and "tokenizer.chat_template" not in show["model_info"]
    assert show["template"] == PHI3_TEMPLATE and show["system"] == "Be brief."
    assert show["license"] == "MIT\ntext\nwith lines" and show["capabilities"] == ["completion"]
    assert show["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert {t["type"] for t in show["tensors"]} == {"F16", "F32"}
    # Go's %-30s %#v, one line per list element, in Go's random map order.
    assert sorted(show["parameters"].splitlines()) == sorted([
        'stop                           "<|end|>"', 'stop                           "a\\x1bb"',
        "temperature                    0.7", "num_ctx                        1.048576e+06",
        "num_predict                    4096", "use_mmap                       true"])
    orders = {httpx.post(f"{url}/api/show", json={"model": "t-show"}).json()["parameters"] for _ in range(8)}
    assert len(orders) > 1

    modelfile = show["modelfile"].splitlines()
    assert modelfile[:4] == ['# Modelfile generated by "ollama show"',
                             "# To build a new Modelfile based on this, replace FROM with:", "# FROM t-show:latest", ""]
    assert modelfile[5] == 'TEMPLATE "{{ if .System }}<|system|>'  # quoted: it has newlines, no double quote
    assert "SYSTEM Be brief." in modelfile and "PARAMETER num_ctx 1.048576e+06" in modelfile
    assert "PARAMETER stop <|end|>" in modelfile and "PARAMETER use_mmap true" in modelfile
    assert "LICENSE MIT" in modelfile and 'LICENSE "text' in modelfile and "MESSAGE assistant Hello." in modelfile
    assert client.show("t-show").modelinfo["general.architecture"] == "phi3"


@pytest.mark.llamacpp  # the server quantizes with llama.cpp's quantizer
def test_quantize_restrictions(url, client, tiny_gguf):
    digest = upload(url, tiny_gguf)
    with pytest.raises(ollama.ResponseError) as err:  # Ollama checks the type inside its worker: a 500
        client.create(model="t-q5", files={"model.gguf": digest}, quantize="q5_K_M", stream=False)
    assert err.value.status_code == 500 and err.value.error == (
        "unsupported quantization type Q5_K_M - supported types are F32, F16, Q4_K_S, Q4_K_M, Q8_0")
    with pytest.raises(ollama.ResponseError) as err:  # streaming: an error line under HTTP 200
        list(client.create(model="t-q5", files={"model.gguf": digest}, quantize="q6_K", stream=True))
    assert err.value.status_code == -1

    seen = statuses(create_lines(url, {"model": "t-q8", "files": {"model.gguf": digest}, "quantize": "Q8_0"}))
    assert seen[0] == "parsing GGUF" and "quantizing F16 model to Q8_0" in seen and seen[-1] == "success"
    assert "validating GGUF model" not in seen and seen.index("verifying conversion") > 1
    q8 = tag_entry(client, "t-q8:latest")
    assert q8.details.quantization_level == "Q8_0" and q8.size < tiny_gguf.stat().st_size
    with pytest.raises(ollama.ResponseError, match="only supported for F16, BF16 and F32 models"):
        client.create(model="t-q4", from_="t-q8", quantize="q4_K_M", stream=False)
    assert client.create(model="t-q8-copy", from_="t-q8", system="Hi.", stream=False).status == "success"
    show = httpx.post(f"{url}/api/show", json={"model": "t-q8-copy"}).json()
    assert show["details"]["parent_model"] == "t-q8:latest" and show["system"] == "Hi."


# --- create: failures, before and after the first line --------------------------------------------------

def test_create_validation(url, client, tiny_gguf, tmp_path):
    digest = upload(url, tiny_gguf)
    cases = [  # checked before the first line: plain HTTP errors
        ({"model": "t-bad"}, "neither 'from' or 'files' was specified"),
        ({"model": "Bad Name!", "files": {"model.gguf": digest}}, "invalid model name"),
        ({"model": "x" * 81, "files": {"model.gguf": digest}}, "invalid model name"),
        ({"model": "t-bad", "files": {"../model.gguf": digest}}, "file path must be relative"),
        ({"model": "t-bad", "files": {"/abs/model.gguf": digest}}, "file path must be relative"),
        ({"model": "t-bad", "files": {"a//model.gguf": digest}}, "file path must be relative"),
        ({"model": "t-bad", "files": {"model.gguf": ""}}, "invalid digest format"),
        ({"model": "t-bad", "files": {}}, "unknown type"),
        ({"model": "t-bad", "files": {"model.bin": sha256(b"nothing")}}, "unknown type"),
    ]
    for body, message in cases:
        r = httpx.post(f"{url}/api/create", json=body)
        assert r.status_code == 400 and r.json() == {"error": message}, body

    # After `parsing GGUF`: in-stream errors under HTTP 200, or the HTTP status with "stream": false.
    missing = "sha256:" + "1" * 64
    with pytest.raises(ollama.ResponseError) as err:
        list(client.create(model="t-bad", files={"model.gguf": missing}, stream=True))
    assert err.value.status_code == -1 and err.value.error.endswith(f"{missing.replace(':', '-')}: "
                                                                     "no such file or directory")
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="t-bad", files={"model.gguf": missing}, stream=False)
    assert err.value.status_code == 500
    not_gguf = os.urandom(2000)
    httpx.post(f"{url}/api/blobs/{sha256(not_gguf)}", content=not_gguf).raise_for_status()
    with pytest.raises(ollama.ResponseError, match="supplied file was not in GGUF format") as err:
        list(client.create(model="t-bad", files={"model.gguf": sha256(not_gguf)}, stream=True))
    assert err.value.status_code == -1
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:-1000])
    r = httpx.post(f"{url}/api/create", json={"model": "t-bad", "files": {"model.gguf": upload(url, truncated)}})
    assert ndjson(r)[0] == {"status": "parsing GGUF"}
    assert re.fullmatch(r'tensor ".*" offset\+size \(\d+\) exceeds file size \(\d+\)', ndjson(r)[-1]["error"])
    assert tag_entry(client, "t-bad:latest") is None


def test_a_gguf_llama_cpp_refuses_fails_validation_in_stream(url, client, server, unknown_arch_gguf):
    creates = server.stats()["creates"]
    body = {"model": "t-arch", "files": {"model.gguf": upload(url, unknown_arch_gguf)}, "template": PHI3_TEMPLATE}
    r = httpx.post(f"{url}/api/create", json=body, timeout=TIMEOUT)
    lines = ndjson(r)
    assert r.status_code == 200 and lines[0] == {"status": "parsing GGUF"}
    assert lines[-1] == {"error": "failed to validate GGUF with llama-quantize without compatibility patches: "
                                  "llama-quantize failed: exit status 1"}
    assert "verifying conversion" not in statuses([(0, obj) for obj in lines])
    assert tag_entry(client, "t-arch:latest") is None and server.stats()["creates"] == creates


def test_a_template_that_does_not_parse_fails_in_stream(url, client, server, tiny_gguf):
    body = {"model": "t-tmpl", "files": {"model.gguf": upload(url, tiny_gguf)},
            "template": "{{ if .System }}unterminated"}
    lines = create_lines(url, body)
    seen = statuses(lines)
    assert seen[0] == "parsing GGUF" and "verifying conversion" in seen  # Go parses it after the rewrite
    assert seen[-1] == "ERROR: template error: template: :1: unexpected EOF"
    assert not any("layer" in s for s in seen)
    r = httpx.post(f"{url}/api/create", json={**body, "stream": False}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json() == {"error": "template error: template: :1: unexpected EOF"}
    r = httpx.post(f"{url}/api/create", json={**body, "template": "{{ .Prompt | nosuchfunc }}", "stream": False},
                   timeout=TIMEOUT)
    assert r.json() == {"error": 'template error: template: :1: function "nosuchfunc" not defined'}
    assert tag_entry(client, "t-tmpl:latest") is None and not manifest_file(server, "t-tmpl:latest").exists()


# --- create: test faults -------------------------------------------------------------------------------

def test_create_rule_fail_http(url, client, server, tiny_gguf):
    digest = upload(url, tiny_gguf)
    faults = server.faults(create_rules=[
        {"model": "t-http", "action": "fail_http", "status": 503, "message": "busy", "times": 1},
        {"model": "t-other:v2", "action": "fail_http"}])
    assert faults["create_rules"][0] == {"model": "t-http", "action": "fail_http", "seconds": 0.0, "status": 503,
                                         "message": "busy", "times": 1}
    for stream in (True, False):  # before any line, whatever the stream mode
        r = httpx.post(f"{url}/api/create", json={"model": "T-HTTP:latest", "files": {"model.gguf": digest},
                                                  "stream": stream}, timeout=TIMEOUT)
        if stream:
            assert r.status_code == 503 and r.json() == {"error": "busy"}
            assert r.headers["content-type"].startswith("application/json")
        else:  # the rule was for one time only
            assert r.status_code == 200 and r.json() == {"status": "success"}
    for _ in range(2):  # times null: every time
        with pytest.raises(ollama.ResponseError) as err:
            list(client.create(model="t-other:v2", files={"model.gguf": digest}, stream=True))
        assert err.value.status_code == 500 and err.value.error == "injected fail_http"
    assert server.faults()["create_rules"][0]["times"] == 0
    with pytest.raises(httpx.HTTPStatusError):
        server.faults(create_rules=[{"model": "*", "action": "explode"}])


def test_create_rule_fail_stream(url, client, server, tiny_gguf):
    digest = upload(url, tiny_gguf)
    creates = server.stats()["creates"]
    server.faults(create_rules=[{"model": "*", "action": "fail_stream", "message": "no space left on device",
                                 "times": 2}])
    seen = []
    with pytest.raises(ollama.ResponseError) as err:
        for event in client.create(model="t-err", files={"model.gguf": digest}, template=PHI3_TEMPLATE, stream=True):
            seen.append(event.status)
    assert err.value.status_code == -1 and err.value.error == "no space left on device"
    assert seen[0] == "parsing GGUF" and set(seen[1:]) == {"validating GGUF model"}
    r = httpx.post(f"{url}/api/create", json={"model": "t-err", "files": {"model.gguf": digest}, "stream": False},
                   timeout=TIMEOUT)
    assert r.status_code == 500 and r.json() == {"error": "no space left on device"}
    assert server.stats()["creates"] == creates and tag_entry(client, "t-err:latest") is None
    assert not manifest_file(server, "t-err:latest").exists()

    server.faults(create_stream_error="boom")  # the shorthand: one fail_stream rule for any model
    assert server.faults()["create_rules"][-1]["message"] == "boom"
    r = httpx.post(f"{url}/api/create", json={"model": "t-err", "files": {"model.gguf": digest}}, timeout=TIMEOUT)
    assert r.status_code == 200 and ndjson(r)[-1] == {"error": "boom"}
    assert client.create(model="t-err", files={"model.gguf": digest}, stream=False).status == "success"


def test_create_rule_silence(url, client, server, tiny_gguf):
    server.faults(create_rules=[{"model": "t-quiet", "action": "silence", "seconds": 1.5}])
    lines = create_lines(url, {"model": "t-quiet", "files": {"model.gguf": upload(url, tiny_gguf)}})
    seen = statuses(lines)
    at = seen.index("verifying conversion")
    # Nothing while the rewritten GGUF is copied and hashed. The times are the client's: a line it reads late
    # (a busy machine) shortens the gap after it, so the gap is held to most of the silence, not all of it.
    assert lines[at + 1][0] - lines[at][0] >= 1.2
    assert seen[at + 1].startswith(("creating new layer", "using existing layer")) and seen[-1] == "success"
    gaps = [b - a for (a, _), (b, _) in zip(lines, lines[1:], strict=False)]
    assert max(gaps[:at] + gaps[at + 1:]) < 1.5


def test_a_client_that_goes_away_abandons_the_create(url, client, server, tiny_gguf):
    """Ollama's create goroutine blocks on its next line once the handler stops reading: it never writes the
    manifest. With "stream": false the handler reads everything, so the create completes."""
    digest = upload(url, tiny_gguf)
    server.faults(create_rules=[{"model": "*", "action": "silence", "seconds": 2, "times": 2}])
    before = server.stats()
    sock = raw_request(url, {"model": "t-gone", "files": {"model.gguf": digest}, "template": PHI3_TEMPLATE})
    received = b""
    while b"verifying conversion" not in received:
        received += sock.recv(65536)
    sock.close()  # during the silence
    wait_for(lambda: server.stats()["creates_abandoned"] > before["creates_abandoned"], what="the abandonment")
    time.sleep(0.5)
    assert tag_entry(client, "t-gone:latest") is None and not manifest_file(server, "t-gone:latest").exists()
    assert server.stats()["creates"] == before["creates"]

    server.clear_requests()
    sock = raw_request(url, {"model": "t-gone-wait", "files": {"model.gguf": digest}, "stream": False})
    wait_for(lambda: [r for r in server.requests() if (r["body"] or {}).get("model") == "t-gone-wait"],
             what="the create to arrive")
    sock.close()
    wait_for(lambda: tag_entry(client, "t-gone-wait:latest"), what="the stream=false create to complete")
    assert server.stats()["creates_abandoned"] == before["creates_abandoned"] + 1


def test_request_log(url, server, tiny_gguf):
    server.clear_requests()
    start = time.monotonic()
    digest = sha256(tiny_gguf.read_bytes())
    with httpx.Client(base_url=url, timeout=TIMEOUT, headers={"X-Probe": "1"}) as http:
        http.get("/api/version")
        http.head(f"/api/blobs/{digest}")
        http.post("/api/create", json={"model": "t-log", "files": {"model.gguf": digest}, "stream": False})
        http.post("/api/show", content=b"{not json")
    log = server.requests()
    assert [(r["method"], r["path"]) for r in log] == [("GET", "/api/version"), ("HEAD", f"/api/blobs/{digest}"),
                                                       ("POST", "/api/create"), ("POST", "/api/show")]
    assert all(r["headers"]["x-probe"] == "1" and "user-agent" in r["headers"] for r in log)
    assert log[2]["body"] == {"model": "t-log", "files": {"model.gguf": digest}, "stream": False}
    assert log[2]["headers"]["content-type"] == "application/json" and log[0]["body"] is None
    assert log[3]["body"] is None
    times = [r["time"] for r in log]
    assert start <= times[0] and times == sorted(times) and times[-1] <= time.monotonic()  # one clock for all
    assert server.clear_requests() == log and server.requests() == []

    # Logged on arrival: a create shows up while it is still running.
    server.faults(create_rules=[{"model": "t-log-slow", "action": "silence", "seconds": 1}])
    done = threading.Event()
    worker = threading.Thread(target=lambda: (httpx.post(f"{url}/api/create", timeout=TIMEOUT, json={
        "model": "t-log-slow", "files": {"model.gguf": digest}, "stream": False}), done.set()))
    worker.start()
    wait_for(lambda: any(r["path"] == "/api/create" for r in server.requests()), what="the logged create")
    assert not done.is_set()
    worker.join()


# --- copy, delete, names, routes, restart --------------------------------------------------------------

def test_copy_and_delete(url, client, tiny_gguf):
    create(client, url, tiny_gguf, "t-copy")
    assert client.copy("t-copy", "t-copy:backup").status == "success"
    original, backup = tag_entry(client, "t-copy:latest"), tag_entry(client, "t-copy:backup")
    assert backup is not None and backup.digest == original.digest

    assert client.delete("t-copy").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.show("t-copy")
    assert err.value.status_code == 404 and err.value.error == "model 't-copy:latest' not found"
    r = httpx.request("DELETE", f"{url}/api/delete", json={"model": "t-copy"})
    assert r.status_code == 404 and r.json() == {"error": "model 't-copy' not found"}
    assert client.show("t-copy:backup").details.family == "phi3"  # the shared blobs survived
    r = httpx.post(f"{url}/api/copy", json={"source": "nope", "destination": "x"})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found'}
    r = httpx.post(f"{url}/api/copy", json={"source": "t-copy:backup", "destination": "bad name"})
    assert r.status_code == 400 and r.json() == {"error": 'destination "bad name" is invalid'}
    assert httpx.post(f"{url}/api/copy", json={"source": "t-copy:backup", "destination": "t-c2"}).content == b""


def test_model_names_follow_ollama():
    assert ModelName.parse("phi") == ModelName("registry.ollama.ai", "library", "phi", "latest")
    assert ModelName.parse("me/phi:q8").display() == "me/phi:q8"
    assert ModelName.parse("localhost:5000/me/phi:q8").host == "localhost:5000"
    assert ModelName.parse("a" * 80 + ":" + "b" * 80) is not None
    for bad in ("a" * 81, "phi:" + "t" * 81, "ns.x/phi", "phi:", ":tag", "-phi", "phi!", "phí", "a/b/c/d", "", "p/"):
        assert ModelName.parse(bad) is None, bad
    assert ModelName.parse("Phi:Q8").same(ModelName.parse("phi:q8"))


def test_names_are_matched_ignoring_case(url, client, tiny_gguf):
    """getExistingName: each part takes the spelling some stored name has, part by part."""
    create(client, url, tiny_gguf, "T-Case:Vx9")
    create(client, url, tiny_gguf, "t-case:vx9", system="Second.")
    assert [m.model for m in client.list().models if m.model.lower() == "t-case:vx9"] == ["T-Case:Vx9"]
    assert httpx.post(f"{url}/api/show", json={"model": "t-case:VX9"}).json()["system"] == "Second."
    create(client, url, tiny_gguf, "t-other:VX9")  # the tag is spelled as T-Case's
    assert tag_entry(client, "t-other:Vx9") is not None


def test_unknown_routes(url):
    assert httpx.get(f"{url}/").text == "Ollama is running"
    r = httpx.get(f"{url}/api/nothing")
    assert r.status_code == 404 and r.json() == {"error": "404 page not found"}
    assert httpx.post(f"{url}/api/tags", json={}).status_code == 405
    assert httpx.post(f"{url}/api/show", content=b"").json() == {"error": "missing request body"}
    assert httpx.post(f"{url}/api/show", json={}).json() == {"error": "model is required"}


def test_hosts_are_independent(ollama_hosts):
    first, second = ollama_hosts(2)
    data = os.urandom(1000)
    httpx.post(f"{first}/api/blobs/{sha256(data)}", content=data).raise_for_status()
    assert httpx.head(f"{second}/api/blobs/{sha256(data)}").status_code == 404


def test_restart_prunes_only_old_unreferenced_blobs(tmp_path, tiny_gguf):
    with OllamaTestServer(tmp_path / "data") as server:
        client = ollama.Client(host=server.url, timeout=TIMEOUT)
        create(client, server.url, tiny_gguf, "t-keep:v1")
        uploaded = sha256(tiny_gguf.read_bytes())  # unreferenced since the rewrite
        stray = os.urandom(5000)
        httpx.post(f"{server.url}/api/blobs/{sha256(stray)}", content=stray).raise_for_status()
        before = tag_entry(client, "t-keep:v1")

        url = server.restart()  # Ollama prunes unreferenced blobs only once they are an hour old
        for digest in (uploaded, sha256(stray)):
            assert httpx.head(f"{url}/api/blobs/{digest}").status_code == 200

        old = time.time() - 3700  # an hour and more: pruned at the next start
        os.utime(server.data_dir / "blobs" / sha256(stray).replace(":", "-"), (old, old))
        url = server.restart()
        assert httpx.head(f"{url}/api/blobs/{sha256(stray)}").status_code == 404
        assert httpx.head(f"{url}/api/blobs/{uploaded}").status_code == 200

        url = server.restart(prune_grace=0)  # the test-only way to prune young blobs
        client = ollama.Client(host=url, timeout=TIMEOUT)
        assert httpx.head(f"{url}/api/blobs/{uploaded}").status_code == 404
        after = tag_entry(client, "t-keep:v1")
        assert after is not None and after.digest == before.digest
        assert client.show("t-keep:v1").template == PHI3_TEMPLATE  # every layer of the model survived


def test_without_go_a_server_does_not_start(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv("PATH", "")
        with pytest.raises(GoToolchainMissing, match="needs the Go toolchain: apt-get install golang-go"):
            ensure_binary(tmp_path / "empty-cache")
    proc = subprocess.run([sys.executable, "-m", "tests.ollama_server", "--data", str(tmp_path / "data")],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": "", "SO8T_GOTEMPLATE_CACHE": str(tmp_path / "empty-cache")})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: the Ollama test server needs the Go toolchain: apt-get install golang-go\n"


def test_the_go_helper_is_built_once_per_source_version(tmp_path):
    assert binary_path().parent.parent == REPO / ".cache" / "gotemplate"
    built = []
    threads = [threading.Thread(target=lambda: built.append(ensure_binary(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 2 and built[0] == built[1] == binary_path(tmp_path) and built[0].is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name != "go-build"] == [built[0].parent.name]


# --- generate, chat ------------------------------------------------------------------------------------

@pytest.mark.llamacpp
def test_generate_runs_llama_cpp(url, client, tiny_gguf):
    create(client, url, tiny_gguf, "t-gen", system="Be brief.")
    options = {"num_predict": 8, "seed": 7, "top_k": 1}
    r = client.generate(model="t-gen", prompt="Say hello.", options=options)
    assert r.done and r.done_reason in ("stop", "length") and r.response
    assert r.eval_count > 0 and r.eval_duration > 0 and r.prompt_eval_count > 5 and r.total_duration > 0
    assert r.eval_count <= 8

    chunks = list(client.generate(model="t-gen", prompt="Say hello.", stream=True, options=options))
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    assert "".join(c.response for c in chunks) == r.response  # same seed, same text
    assert chunks[-1].eval_count == r.eval_count

    # Without a seed Ollama draws one per request (seed -1), and so does the test server.
    replies = {client.generate(model="t-gen", prompt="Hi.", options={"num_predict": 12, "temperature": 1.5}).response
               for _ in range(4)}
    assert len(replies) > 1

    assert [m.model for m in client.ps().models] == ["t-gen:latest"]
    assert client.ps().models[0].context_length == 512  # the model's num_ctx
    unloaded = client.generate(model="t-gen", prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload" and client.ps().models == []
    client.generate(model="t-gen", prompt="Hi.", options={"num_predict": 2}, keep_alive=0)
    assert client.ps().models == []  # keep_alive 0 unloads after the request


@pytest.mark.llamacpp
def test_generate_stop_strings_and_raw(url, client, tiny_gguf):
    create(client, url, tiny_gguf, "t-stop")
    options = {"num_predict": 24, "seed": 1, "top_k": 1, "stop": ["<|end|>"]}
    full = client.generate(model="t-stop", prompt="Count.", options=options).response
    stop = next((ch for ch in full[1:] if ch.isascii() and ch.isalnum()), None)
    assert stop, f"no ASCII character to stop at in {full!r}"
    cut = client.generate(model="t-stop", prompt="Count.", options={**options, "stop": [stop]})
    assert cut.response == full[:full.index(stop)] and cut.done_reason == "stop"

    raw = client.generate(model="t-stop", prompt="<|user|>\nCount.<|end|>\n<|assistant|>\n", raw=True,
                          options=options)
    assert raw.response == full  # the template renders exactly this prompt


@pytest.mark.llamacpp
@pytest.mark.parametrize("template", [PHI3_TEMPLATE, MESSAGES_TEMPLATE], ids=["legacy", "messages"])
def test_chat_renders_every_turn_with_go_templates(url, client, tiny_gguf, template):
    """A multi-turn chat runs on exactly the prompt Ollama's Template.Execute builds (checked against a raw
    generate of that prompt: same tokens in, same tokens out)."""
    name = f"t-chat-{'legacy' if template == PHI3_TEMPLATE else 'messages'}"
    create(client, url, tiny_gguf, name, template=template, parameters={"num_ctx": 512})
    options = {"num_predict": 6, "seed": 3, "top_k": 1}
    chat = client.chat(model=name, messages=TURNS, options=options)
    raw = client.generate(model=name, prompt=TURNS_PROMPT, raw=True, options=options)
    assert chat.message.content == raw.response and chat.prompt_eval_count == raw.prompt_eval_count
    assert chat.eval_count > 0 and chat.eval_duration > 0 and chat.load_duration >= 0
    chunks = list(client.chat(model=name, messages=TURNS, stream=True, options={"num_predict": 4}))
    assert chunks[-1].done and chunks[-1].eval_count > 0


def test_generate_faults_and_errors(url, client, server, tiny_gguf):
    create(client, url, tiny_gguf, "t-fault")
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope", prompt="hi")
    assert err.value.status_code == 404 and err.value.error == "model 'nope' not found"

    server.faults(fail_generate=True)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="t-fault", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 500 and err.value.error == "injected failure"

    server.faults(fail_generate=False, generate_response="hello there world", generate_tokens_per_second=20)
    r = client.generate(model="t-fault", prompt="hi")
    assert r.response == "hello there world" and r.eval_count == 3 and r.done_reason == "stop"
    assert r.eval_count / r.eval_duration * 1e9 == pytest.approx(20)
    chunks = list(client.chat(model="t-fault", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.message.content for c in chunks) == "hello there world" and chunks[-1].done
    with pytest.raises(ollama.ResponseError) as err:  # options are typed as Ollama's api.Options
        client.generate(model="t-fault", prompt="hi", options={"stop": "<|end|>"})
    assert err.value.status_code == 500 and err.value.error == 'option "stop" must be of type array'
    r = httpx.post(f"{url}/api/generate", json={"model": "t-fault", "prompt": "hi", "raw": True, "system": "x"})
    assert r.status_code == 400 and r.json() == {"error": "raw mode does not support template, system, or context"}


def test_sampling_defaults_are_ollamas():
    opts = Options.build({}, None)
    assert (opts.seed, opts.temperature, opts.top_k, opts.top_p, opts.min_p) == (-1, 0.8, 40, 0.9, 0.0)
    assert (opts.num_predict, opts.repeat_penalty, opts.repeat_last_n, opts.num_ctx) == (-1, 1.0, 64, 4096)
    assert DEFAULT_OPTIONS["seed"] == -1
    model = {"num_ctx": 1048576.0, "temperature": 0.2, "seed": 5, "stop": ["a"], "mirostat": 1}
    opts = Options.build(model, {"temperature": 0, "top_k": 3.9})
    assert (opts.num_ctx, opts.temperature, opts.seed, opts.stop, opts.top_k) == (1048576, 0.0, 5, ["a"], 3)
    assert parse_keep_alive(None) == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive(0) == 0
    assert parse_keep_alive(-1) is None and parse_keep_alive("-5m") is None and parse_keep_alive(2.5) == 2.5
    with pytest.raises(Exception, match="invalid duration"):
        parse_keep_alive("10")


# --- Go semantics: templates, %#v, JSON ----------------------------------------------------------------

def test_go_templates_render_like_ollama(go_templates):
    render = go_templates.render
    assert render(PHI3_TEMPLATE, TURNS) == TURNS_PROMPT  # each turn whole, the last one cut after .Response
    assert render(MESSAGES_TEMPLATE, TURNS) == TURNS_PROMPT
    # System messages are collated (joined, and moved to .System), consecutive turns of one role merged.
    messages = [{"role": "system", "content": "S1"}, {"role": "user", "content": "A"},
                {"role": "user", "content": "B"}, {"role": "system", "content": "S2"}]
    assert render("{{ .System }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}", messages) == (
        "S1\n\nS2|system=S1;user=A\n\nB;system=S2;")
    assert render(PHI3_TEMPLATE, messages) == (  # a system message after a prompt closes that turn
        "<|system|>\nS1<|end|>\n<|user|>\nA\n\nB<|end|>\n<|assistant|>\n<|end|>\n<|system|>\nS2<|end|>\n<|assistant|>\n")
    # A template without .Messages or .Response gets {{ .Response }} appended, which a prompt stops at.
    assert render("Q: {{ .Prompt }} A:", [{"role": "user", "content": "x"}]) == "Q: x A:"
    assert render("{{ .Prompt }}", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}]) == "abc"
    assert render("{{ .Prompt }}{{ .Missing }}", [{"role": "user", "content": "a"}]) == "a<no value>"
    messages = [{"role": "user", "content": "<x>"}]
    assert render("{{ range .Messages }}{{ json .Content }}{{ end }}", messages) == '"\\u003cx\\u003e"'
    with pytest.raises(TemplateError, match='"json" is not a defined function'):  # Ollama runs the cut last turn
        render("{{ json .Prompt }}", messages)  # of a legacy template without its functions
    assert render("{{ .Prompt }}:{{ .Suffix }}", [], prompt="p", suffix="s") == "p:s"
    assert go_templates.parse(PHI3_TEMPLATE) == ["prompt", "response", "system"]
    with pytest.raises(TemplateError, match=r"template: :1: unexpected EOF"):
        go_templates.parse("{{ if .System }}")
    with pytest.raises(TemplateError, match="can't evaluate field Nope"):
        render("{{ range .Messages }}{{ .Nope }}{{ end }}", TURNS)


GO_SHARP_V = [  # checked with Go 1.19: fmt.Sprintf("%#v", v) of the value json.Unmarshal gives
    (1048576, "1.048576e+06"), (4096, "4096"), (0.7, "0.7"), (1, "1"), (123456, "123456"), (1234567, "1.234567e+06"),
    (0.0001, "0.0001"), (0.00001, "1e-05"), (1e21, "1e+21"), (2.5e-5, "2.5e-05"), (-3.75, "-3.75"), (-0.0, "-0"),
    (9007199254740993, "9.007199254740992e+15"), (0.1 + 0.2, "0.30000000000000004"), ("a\x1bb", '"a\\x1bb"'),
    ("<|end|>", '"<|end|>"'), ("é\u00a0\u200d\u2028\"\\\t\n", '"é\\u00a0\\u200d\\u2028\\"\\\\\\t\\n"'),
    ("\U0001f600\U000e0001\x7f", '"\U0001f600\\U000e0001\\x7f"'), (True, "true"), (False, "false"), (None, "<nil>"),
    ([1, "a"], '[]interface {}{1, "a"}'),
    ({"b": 1, "a": [True]}, 'map[string]interface {}{"a":[]interface {}{true}, "b":1}'),
]


def test_go_sharp_v_formatting():
    for value, expected in GO_SHARP_V:
        assert sharp_v(value) == expected, value
    assert plain_v("a\x1bb") == "a\x1bb" and plain_v(1048576) == "1.048576e+06" and plain_v([1, "a"]) == "[1 a]"
    assert go_json({"b": "<a&\b>", "a": 1e21, "c": 1e-7, "d": 4096, "e": "\u2028é"}) == (
        '{"a":1e+21,"b":"\\u003ca\\u0026\\b\\u003e","c":1e-7,"d":4096,"e":"\\u2028é"}')


def test_go_formatting_matches_go_itself(go_templates):
    rng = random.Random(10)

    def text() -> str:  # blocks that Unicode 13 (Go 1.19) and 15 (Python, Ollama's Go) fill alike
        ranges = [(0, 0x7F), (0x80, 0x24F), (0x370, 0x4FF), (0x2000, 0x206F), (0x3000, 0x303F), (0x1F300, 0x1F64F),
                  (0xE0000, 0xE007F)]
        return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(6))

    values = [rng.choice([rng.uniform(-1e9, 1e9), rng.random() / 10 ** rng.randint(0, 12), rng.randint(0, 10**18),
                          10.0 ** rng.randint(-30, 30), text(), rng.random() < 0.5]) for _ in range(300)]
    params = {f"k{i:03d}": v for i, v in enumerate(values)}
    params["list"] = values[:20]
    lines, plain = go_templates.show_parameters(params)
    expected = [f"{k:<30} {sharp_v(v)}" for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])]
    assert lines == sorted(expected)
    assert plain == sorted(f"{k} {plain_v(v)}" for k, vs in params.items()
                           for v in (vs if isinstance(vs, list) else [vs]))
    strings = [v for v in values if isinstance(v, str) and "\b" not in v and "\f" not in v]  # Go 1.22 changed those
    assert go_templates.json(strings) == go_json(strings)
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    assert go_templates.json(numbers) == go_json(numbers)
