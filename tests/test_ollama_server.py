"""Tests of the Ollama-compatible test server (tests/ollama_server.py), through the official client and raw HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import ollama
import pytest

from tests.ollama_server import OllamaTestServer, ServerPool, render_prompt, render_template

PHI3_TEMPLATE = """{{ if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}{{ if .Prompt }}<|user|>
{{ .Prompt }}<|end|>
{{ end }}<|assistant|>
{{ .Response }}<|end|>"""
PHI3_STOPS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
TIMEOUT = 30


# --- fixtures (reusable: the main developer may move them to conftest.py) -------------------------------

@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Phi-3 converted to an F16 GGUF (about 5 s, once per session)."""
    from so8t_deploy.convert import convert_model_dir
    from so8t_deploy.tiny_models import write_tiny_model

    tmp = tmp_path_factory.mktemp("tiny-gguf")
    model = write_tiny_model(tmp / "model", "phi3", hidden_size=64)
    out = tmp / "model-f16.gguf"
    convert_model_dir(model, out, "f16")
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
def url(shared_url, ollama_pool) -> str:
    """The shared server, with no faults set before and after the test."""
    server = ollama_pool.server(shared_url)
    server.faults(reset=True)
    yield shared_url
    server.faults(reset=True)


@pytest.fixture
def client(url) -> ollama.Client:
    return ollama.Client(host=url, timeout=TIMEOUT)


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


def tag_entry(client: ollama.Client, name: str):
    return next((m for m in client.list().models if m.model == name), None)


def ndjson(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


# --- version, blobs ------------------------------------------------------------------------------------

def test_version_and_old_server(url, ollama_pool):
    assert httpx.get(f"{url}/api/version").json() == {"version": "0.32.15"}
    ollama_pool.server(url).faults(version="0.5.4")
    assert httpx.get(f"{url}/api/version").json() == {"version": "0.5.4"}
    r = httpx.post(f"{url}/api/create", json={"model": "x", "files": {"model.gguf": "sha256:" + "0" * 64}})
    assert r.status_code == 400 and r.json() == {"error": "path or Modelfile are required"}


def test_blob_lifecycle(url, ollama_pool):
    server = ollama_pool.server(url)
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

        other = os.urandom(1000)
        mismatch = http.post(f"/api/blobs/{sha256(data[:10])}", content=other)
        assert mismatch.status_code == 400 and mismatch.json() == {"error": "digest mismatch"}
        assert http.head(f"/api/blobs/{sha256(data[:10])}").status_code == 404
        assert http.post("/api/blobs/sha256:abc", content=other).status_code == 400
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


def test_cut_uploads_leave_no_blob(url, ollama_pool):
    server = ollama_pool.server(url)
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
    deadline = time.monotonic() + 10
    while any((server.data_dir / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any((server.data_dir / "tmp").iterdir())
    assert httpx.head(f"{url}/api/blobs/{digest}").status_code == 404

    # The fault is spent.
    assert httpx.post(f"{url}/api/blobs/{digest}", content=data, timeout=TIMEOUT).status_code == 201


# --- create, tags, show --------------------------------------------------------------------------------

def test_create_tags_show(url, client, tiny_gguf):
    assert create(client, url, tiny_gguf, "t-show", system="Be brief.").status == "success"
    entry = tag_entry(client, "t-show:latest")
    assert entry is not None and entry.size > tiny_gguf.stat().st_size
    assert entry.details.format == "gguf" and entry.details.family == "phi3"
    assert entry.details.quantization_level == "F16" and entry.details.parameter_size.endswith("K")

    show = httpx.post(f"{url}/api/show", json={"model": "t-show"}).json()
    assert show["model_info"]["general.architecture"] == "phi3"
    assert any(key.startswith("so8t.") for key in show["model_info"])
    assert show["template"] == PHI3_TEMPLATE and show["system"] == "Be brief."
    assert show["capabilities"] == ["completion"]
    assert 'stop                           "<|end|>"' in show["parameters"].splitlines()
    assert "temperature                    0.7" in show["parameters"].splitlines()
    modelfile = show["modelfile"]
    assert 'SYSTEM """Be brief."""' in modelfile and "PARAMETER stop <|end|>" in modelfile
    assert "\nFROM /" in modelfile and "/sha256-" + upload(url, tiny_gguf)[7:] in modelfile
    assert client.show("t-show").modelinfo["general.architecture"] == "phi3"

    # The manifest digest covers the GGUF, template, system and parameters, and nothing else.
    create(client, url, tiny_gguf, "t-show", system="Be brief.")
    assert tag_entry(client, "t-show:latest").digest == entry.digest
    create(client, url, tiny_gguf, "t-show", system="Be verbose.")
    assert tag_entry(client, "t-show:latest").digest != entry.digest


def test_create_streams_status_lines(url, client, tiny_gguf):
    digest = upload(url, tiny_gguf)
    events = list(client.create(model="t-stream:v1", files={"model.gguf": digest}, template=PHI3_TEMPLATE,
                                stream=True))
    statuses = [e.status for e in events]
    assert statuses[0] == "parsing GGUF" and statuses[1] == f"using existing layer {digest}"
    assert statuses[-2:] == ["writing manifest", "success"]
    assert all(re.fullmatch(r"(using existing|creating new) layer sha256:[0-9a-f]{64}", s) for s in statuses[1:-2])


def test_create_validation(url, client, tiny_gguf):
    digest = upload(url, tiny_gguf)
    missing = "sha256:" + "1" * 64
    cases = [
        ({"model": "t-bad"}, "neither 'from' or 'files' was specified"),
        ({"model": "Bad Name!", "files": {"model.gguf": digest}}, "invalid model name"),
        ({"model": "t-bad", "files": {"model.gguf": missing}}, "blob not found for model.gguf"),
        ({"model": "t-bad", "files": {"../model.gguf": digest}}, "file path must be relative"),
        ({"model": "t-bad", "files": {"/abs/model.gguf": digest}}, "file path must be relative"),
        ({"model": "t-bad", "files": {"model.bin": digest}}, "unsupported file type"),
    ]
    for body, message in cases:
        r = httpx.post(f"{url}/api/create", json=body)
        assert r.status_code == 400 and message in r.json()["error"], body
    r = httpx.post(f"{url}/api/create", json={"model": "t-bad", "files": {"model.gguf": digest},
                                               "template": "{{ if .System }}unterminated"})
    assert r.status_code == 400 and "template" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="t-bad", files={"model.gguf": missing}, stream=False)
    assert err.value.status_code == 400

    not_gguf = os.urandom(2000)
    httpx.post(f"{url}/api/blobs/{sha256(not_gguf)}", content=not_gguf).raise_for_status()
    with pytest.raises(ollama.ResponseError, match="invalid GGUF") as err:
        list(client.create(model="t-bad", files={"model.gguf": sha256(not_gguf)}, stream=True))
    assert err.value.status_code == -1
    assert tag_entry(client, "t-bad:latest") is None


@pytest.mark.llamacpp  # the server quantizes with llama.cpp's quantizer
def test_quantize_restrictions(url, client, tiny_gguf):
    digest = upload(url, tiny_gguf)
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="t-q5", files={"model.gguf": digest}, quantize="q5_K_M", stream=False)
    assert err.value.status_code == 400 and "unsupported quantization type Q5_K_M" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:  # streaming: an error line under HTTP 200
        list(client.create(model="t-q5", files={"model.gguf": digest}, quantize="q6_K", stream=True))
    assert err.value.status_code == -1

    assert client.create(model="t-q8", files={"model.gguf": digest}, quantize="Q8_0", stream=False).status == "success"
    q8 = tag_entry(client, "t-q8:latest")
    assert q8.details.quantization_level == "Q8_0" and q8.size < tiny_gguf.stat().st_size
    with pytest.raises(ollama.ResponseError, match="only supported for F16"):
        client.create(model="t-q4", from_="t-q8", quantize="q4_K_M", stream=False)


def test_create_stream_error_mid_stream(url, client, ollama_pool, tiny_gguf):
    server = ollama_pool.server(url)
    digest = upload(url, tiny_gguf)
    creates = server.stats()["creates"]
    server.faults(create_stream_error="no space left on device")
    seen = []
    with pytest.raises(ollama.ResponseError) as err:
        for event in client.create(model="t-err", files={"model.gguf": digest}, stream=True):
            seen.append(event.status)
    assert err.value.status_code == -1 and err.value.error == "no space left on device"
    assert seen[0] == "parsing GGUF" and "success" not in seen
    assert tag_entry(client, "t-err:latest") is None

    server.faults(create_stream_error="boom")
    r = httpx.post(f"{url}/api/create", json={"model": "t-err", "files": {"model.gguf": digest}}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    assert ndjson(r)[-1] == {"error": "boom"}
    assert server.stats()["creates"] == creates and tag_entry(client, "t-err:latest") is None


# --- copy, delete, routes, restart ---------------------------------------------------------------------

def test_copy_and_delete(url, client, tiny_gguf):
    create(client, url, tiny_gguf, "t-copy")
    assert client.copy("t-copy", "t-copy:backup").status == "success"
    original, backup = tag_entry(client, "t-copy:latest"), tag_entry(client, "t-copy:backup")
    assert backup is not None and backup.digest == original.digest

    assert client.delete("t-copy").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.show("t-copy")
    assert err.value.status_code == 404 and err.value.error == "model 't-copy' not found"
    r = httpx.request("DELETE", f"{url}/api/delete", json={"model": "t-copy"})
    assert r.status_code == 404 and r.json() == {"error": "model 't-copy' not found"}
    assert client.show("t-copy:backup").details.family == "phi3"  # the shared blob survived
    assert httpx.post(f"{url}/api/copy", json={"source": "nope", "destination": "x"}).status_code == 404


def test_unknown_routes(url):
    assert httpx.get(f"{url}/").text == "Ollama is running"
    r = httpx.get(f"{url}/api/nothing")
    assert r.status_code == 404 and r.json() == {"error": "404 page not found"}
    assert httpx.post(f"{url}/api/tags", json={}).status_code == 405
    assert httpx.post(f"{url}/api/show", content=b"").json() == {"error": "missing request body"}


def test_hosts_are_independent(ollama_hosts):
    first, second = ollama_hosts(2)
    data = os.urandom(1000)
    httpx.post(f"{first}/api/blobs/{sha256(data)}", content=data).raise_for_status()
    assert httpx.head(f"{second}/api/blobs/{sha256(data)}").status_code == 404


def test_restart_keeps_models_and_prunes_unreferenced_blobs(tmp_path, tiny_gguf):
    with OllamaTestServer(tmp_path / "data") as server:
        client = ollama.Client(host=server.url, timeout=TIMEOUT)
        create(client, server.url, tiny_gguf, "t-keep:v1")
        stray = os.urandom(5000)
        httpx.post(f"{server.url}/api/blobs/{sha256(stray)}", content=stray).raise_for_status()
        before = tag_entry(client, "t-keep:v1")

        url = server.restart()
        client = ollama.Client(host=url, timeout=TIMEOUT)
        after = tag_entry(client, "t-keep:v1")
        assert after is not None and after.digest == before.digest
        assert httpx.head(f"{url}/api/blobs/{sha256(stray)}").status_code == 404
        assert httpx.head(f"{url}/api/blobs/{upload(url, tiny_gguf)}").status_code == 200
        assert server.stats()["blob_uploads"] == 0  # the GGUF was still there
        assert client.show("t-keep:v1").template == PHI3_TEMPLATE


# --- generate, chat ------------------------------------------------------------------------------------

@pytest.mark.llamacpp
def test_generate_runs_llama_cpp(url, client, tiny_gguf):
    create(client, url, tiny_gguf, "t-gen", system="Be brief.")
    r = client.generate(model="t-gen", prompt="Say hello.", options={"num_predict": 8, "seed": 7, "top_k": 1})
    assert r.done and r.done_reason in ("stop", "length") and r.response
    assert r.eval_count > 0 and r.eval_duration > 0 and r.prompt_eval_count > 5 and r.total_duration > 0
    assert r.eval_count <= 8

    chunks = list(client.generate(model="t-gen", prompt="Say hello.", stream=True,
                                  options={"num_predict": 8, "seed": 7, "top_k": 1}))
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    assert "".join(c.response for c in chunks) == r.response  # same seed, same text
    assert chunks[-1].eval_count == r.eval_count

    # Without a seed the test server uses --seed (default 0), so runs repeat.
    assert client.generate(model="t-gen", prompt="Hi.", options={"num_predict": 8}).response == (
        client.generate(model="t-gen", prompt="Hi.", options={"num_predict": 8}).response)

    assert [m.model for m in client.ps().models] == ["t-gen:latest"]
    unloaded = client.generate(model="t-gen", prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload" and client.ps().models == []


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
def test_chat_runs_llama_cpp(url, client, tiny_gguf):
    create(client, url, tiny_gguf, "t-chat")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    r = client.chat(model="t-chat", messages=messages, options={"num_predict": 6, "seed": 3, "top_k": 1})
    assert r.done and r.message.role == "assistant" and r.message.content
    assert r.eval_count > 0 and r.eval_duration > 0 and r.load_duration >= 0
    chunks = list(client.chat(model="t-chat", messages=messages, stream=True, options={"num_predict": 4}))
    assert chunks[-1].done and chunks[-1].eval_count > 0


def test_generate_faults_and_errors(url, client, ollama_pool, tiny_gguf):
    create(client, url, tiny_gguf, "t-fault")
    server = ollama_pool.server(url)
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


# --- the template renderer -----------------------------------------------------------------------------

def test_render_phi3_template():
    prompt = render_prompt(PHI3_TEMPLATE, [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert prompt == "<|system|>\nS<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n"
    turns = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]
    # Earlier turns render the whole template (Response included), as Ollama does; the template has no newline
    # after the last <|end|>, so neither does the prompt.
    assert render_prompt(PHI3_TEMPLATE, turns) == (
        "<|user|>\nA<|end|>\n<|assistant|>\nB<|end|><|user|>\nC<|end|>\n<|assistant|>\n")


def test_render_messages_template():
    template = ('{{- range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}\n{{ else if eq .Role "assistant" }}'
                'A:{{ .Content }}\n{{- else }}S:{{ .Content }}\n{{ end }}{{ end }}A:')
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"}]
    assert render_prompt(template, messages) == "S:sys\nU:hi\nA:yoU:x\nA:"
    assert render_template("a  {{- .X -}}  b{{/* note */}}", {"X": 1}) == "a1b"
    assert render_template('{{ if not .B }}{{ if eq .A 1 2 }}x{{ end }}{{ end }}', {"A": 2}) == "x"
