"""Registry mode's building blocks against a real registry (Debian's docker-registry, CNCF distribution 2.8):
the Ollama image of a tag, pushing it once, and the probe that says whether Ollama hosts can pull from it."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from so8t_deploy.errors import RegistryError
from so8t_deploy.external.gguf_info import GgufInfo
from so8t_deploy.external.registry import MANIFEST_MEDIA_TYPE, RegistryClient
from so8t_deploy.manifest.deploy_schema import Registry, RegistryAuth
from so8t_deploy.rollout.image import CONFIG_MEDIA_TYPE, ImageContent, build_image, parameter_size

SECRET = "s3cret-registry-password"


def settings(url: str, password: str | None = None) -> Registry:
    auth = RegistryAuth(username="deployer", password=SecretStr(password)) if password is not None else None
    return Registry(url=url, namespace="so8t", insecure=url.startswith("http://"), auth=auth)


def image(tmp_path: Path, url: str, *, template: str = "{{ .Prompt }}", system: str | None = "Be brief."):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    info = GgufInfo(path=gguf, architecture="phi3", file_type=15, n_params=3_821_079_552, tensor_bytes=0)
    content = ImageContent(gguf, hashlib.sha256(gguf.read_bytes()).hexdigest(), info, template, system,
                           {"temperature": 0.7, "stop": ["<|end|>"]})
    return build_image(settings(url), "demo:full-q4_k_m", content, {"gguf.sha256": "abc"})


@pytest.mark.parametrize(("count", "shown"), [(0, "0"), (999, "999"), (1000, "1K"), (1001, "1K"), (10**6, "1M"),
                                              (125 * 10**6, "125M"), (500_500_000, "500.50M"),
                                              (500_550_000, "500.55M"), (10**9, "1B"), (2_800_000_000, "2.8B"),
                                              (2_850_000_000, "2.9B"), (10**12, "1000B")])
def test_parameter_size_is_ollamas_human_number(count, shown):
    assert parameter_size(count) == shown  # the cases of Ollama's format/format_test.go


def test_the_image_is_ollamas_format_and_depends_on_content_only(tmp_path):
    first = image(tmp_path, "http://127.0.0.1:5000")
    manifest = json.loads(first.manifest)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == MANIFEST_MEDIA_TYPE
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        "application/vnd.ollama.image.model", "application/vnd.ollama.image.template",
        "application/vnd.ollama.image.system", "application/vnd.ollama.image.params"]
    gguf = first.layers[0].source
    assert manifest["layers"][0]["digest"] == "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    params = json.loads(first.layers[3].source)
    assert params == {"stop": ["<|end|>"], "temperature": 0.7}
    config = json.loads(first.config.source)
    assert manifest["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    assert {k: config[k] for k in ("model_format", "model_family", "model_type", "file_type")} == {
        "model_format": "gguf", "model_family": "phi3", "model_type": "3.8B", "file_type": "Q4_K_M"}
    assert manifest["annotations"] == {"dev.so8t.gguf.sha256": "abc"}
    assert first.reference == "127.0.0.1:5000/so8t/demo:full-q4_k_m" and first.repository == "so8t/demo"
    assert first.digest == "sha256:" + hashlib.sha256(first.manifest).hexdigest()

    assert image(tmp_path, "http://127.0.0.1:5000").manifest == first.manifest  # same content, same bytes
    other = image(tmp_path, "http://127.0.0.1:5000", system=None)
    assert other.digest != first.digest and len(other.layers) == 3


def test_an_image_is_pushed_once_and_the_registry_agrees_on_its_digest(tmp_path, make_registry):
    server = make_registry()
    built = image(tmp_path, server.url)
    with RegistryClient(settings(server.url)) as client:
        for blob in built.blobs:
            assert client.push_blob(built.repository, blob.digest, blob.size, blob.source) == blob.size
        assert client.put_manifest(built.repository, built.registry_tag, built.manifest) == built.digest
        assert client.sent_bytes == sum(b.size for b in built.blobs) + len(built.manifest)
        assert client.manifest_digest(built.repository, built.registry_tag) == built.digest
        assert all(client.push_blob(built.repository, b.digest, b.size, b.source) == 0 for b in built.blobs)
        client.check_blob_answer(built.repository, built.config.digest)
    stored = httpx.get(f"{server.url}/v2/{built.repository}/manifests/{built.registry_tag}",
                       headers={"Accept": MANIFEST_MEDIA_TYPE})
    assert stored.content == built.manifest  # byte for byte: what a host pulls and lists the digest of


def test_a_blob_that_is_not_its_digest_is_refused(tmp_path, make_registry):
    server = make_registry()
    with RegistryClient(settings(server.url)) as client, pytest.raises(RegistryError, match="another digest"):
        client.push_blob("so8t/demo", "sha256:" + "0" * 64, 5, b"hello")


def test_pushing_with_credentials_and_a_wrong_password_says_so_without_it(tmp_path, make_registry):
    server = make_registry(auth=("deployer", SECRET))
    built = image(tmp_path, server.url)
    with RegistryClient(settings(server.url, SECRET)) as client:
        for blob in built.blobs:
            client.push_blob(built.repository, blob.digest, blob.size, blob.source)
        assert client.put_manifest(built.repository, built.registry_tag, built.manifest) == built.digest
    for password in (None, "wrong-password-123"):
        with RegistryClient(settings(server.url, password)) as client, pytest.raises(RegistryError) as failed:
            client.push_blob(built.repository, "sha256:" + "1" * 64, 3, b"abc")
        assert "HTTP 401" in str(failed.value) and "distribution.registry.auth" in str(failed.value)
        assert SECRET not in str(failed.value) and "wrong-password" not in str(failed.value)


def test_the_probe_says_in_one_line_why_hosts_could_not_pull(tmp_path, make_registry):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with RegistryClient(settings(closed), backoff=0.01) as client:
        probe = client.probe("so8t/demo")
    assert not probe.reachable and "unreachable" in probe.problem and "\n" not in probe.problem

    private = make_registry(auth=("deployer", SECRET))
    with RegistryClient(settings(private.url, SECRET)) as client:
        probe = client.probe("so8t/demo")
    assert probe.reachable and probe.anonymous_reads is False
    assert "refuses anonymous reads" in probe.problem and "allow anonymous pulls of so8t/demo" in probe.problem

    fine = make_registry()
    with RegistryClient(settings(fine.url)) as client:
        probe = client.probe("so8t/demo")
    assert probe.ok and probe.anonymous_reads and probe.location_header  # its /v2/ answer carries the header

    bare = make_registry(location_header=False)
    built = image(tmp_path, bare.url)
    with RegistryClient(settings(bare.url)) as client:
        assert client.probe(built.repository).location_header is None  # nothing published: not known yet
        client.push_blob(built.repository, built.config.digest, built.config.size, built.config.source)
        probe = client.probe(built.repository, built.config.digest)
        assert probe.location_header is False and "no Location header" in probe.problem
        assert "Location: [\"?\"]" in probe.problem  # with the fix
        with pytest.raises(RegistryError, match="no Location header"):
            client.check_blob_answer(built.repository, built.config.digest)


class _FakeRegistry(BaseHTTPRequestHandler):
    """What some registries answer and distribution does not: a token realm, redirects to storage. Routes by path:
    /v2/ (a Bearer challenge whose realm is /token on this host), /token (`token` or only `access_token`), a blob
    (401 without the token, else a 307 to `/storage` on `redirect_to`), /storage (200, without a Location)."""

    token_field = "token"
    redirect_to = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        host = f"http://{self.headers['Host']}"
        if self.path.startswith("/token"):
            self._answer(200, json.dumps({self.token_field: "tok"}).encode())
        elif self.path.startswith("/storage"):
            self._answer(200, b"blob")
        elif self.headers.get("Authorization") != "Bearer tok":
            self._answer(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{host}/token",service="fake",'
                                                          'scope="repository:so8t/demo:pull"'})
        elif self.path == "/v2/":
            self._answer(200, b"{}")
        else:
            self._answer(307, b"", {"Location": f"{self.redirect_to or host}/storage"})

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_registry():
    def start(**attributes) -> str:
        handler = type("Handler", (_FakeRegistry,), attributes)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    servers: list[ThreadingHTTPServer] = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_blob_check_takes_ollamas_token_and_follows_redirects_that_stay_on_the_host(fake_registry):
    digest = "sha256:" + "2" * 64
    # A 307 to storage on another host ends Ollama's redirects: the Location is what it downloads from.
    storage = fake_registry().replace("127.0.0.1", "localhost")
    url = fake_registry(redirect_to=storage)
    with RegistryClient(settings(url)) as client:
        assert client.probe("so8t/demo").anonymous_reads  # an anonymous token from a realm on its own host
        client.check_blob_answer("so8t/demo", digest)
    # The same redirect to another port of the same host is followed, as Ollama does, to a 200 with no Location.
    url = fake_registry(redirect_to=fake_registry())
    with RegistryClient(settings(url), backoff=0.01) as client, pytest.raises(RegistryError, match="no Location"):
        client.check_blob_answer("so8t/demo", digest)
    # Ollama reads the realm's `token` only: an answer with only `access_token` leaves its pulls unauthorized.
    url = fake_registry(token_field="access_token", redirect_to=storage)
    with RegistryClient(settings(url)) as client:
        assert "refuses anonymous reads" in client.probe("so8t/demo").problem
        with pytest.raises(RegistryError, match="HTTP 401"):
            client.check_blob_answer("so8t/demo", digest)


def test_names_a_host_lists_and_what_registry_mode_makes_of_them(tmp_path):
    from so8t_deploy.manifest.loader import parse_manifest
    from so8t_deploy.rollout.host_plan import HostPlan, name_parts, pulled_copy_of, spelling_problem, tag_spellings

    assert name_parts("llama3:8b") == ("registry.ollama.ai", "library", "llama3", "8b")
    assert name_parts("me/llama3") == ("registry.ollama.ai", "me", "llama3", "latest")
    assert name_parts("127.0.0.1:5000/fleet/demo:q8_0") == ("127.0.0.1:5000", "fleet", "demo", "q8_0")
    (tmp_path / "model").mkdir()
    text = (f"apiVersion: so8t-deploy/v1\nname: demo\nsource: {{model: {tmp_path / 'model'}}}\nquantize: [q8_0, f16]\n"
            "modelfile: {template: phi3}\n"
            "distribution: {registry: {url: 'http://127.0.0.1:5000', namespace: fleet, insecure: true}}\n")
    manifest = parse_manifest(text, source=tmp_path / "m.yaml")
    # Any registry's pull of a named tag is a leftover of a stopped run, whatever the settings are now.
    assert pulled_copy_of(manifest, "old.example:443/team/demo:Q8_0") == "demo:q8_0"
    assert pulled_copy_of(manifest, "127.0.0.1:5000/fleet/demo:q4_0") is None  # not a tag of the manifest
    assert pulled_copy_of(manifest, "fleet/demo:q8_0") is None  # Ollama's own registry: a model someone pulled
    # Ollama reuses the spelling of a part it holds: a tag is published under it, a repository path cannot be.
    host = HostPlan(target="a", url="http://a", observed={"hf.co/x/y:Q8_0": "1", "demo:f16": "2"})
    assert tag_spellings(manifest, [host]) == {"demo:q8_0": {"Q8_0"}}
    assert spelling_problem(manifest, host.observed) is None
    assert "'Fleet'" in spelling_problem(manifest, {"Fleet/other:latest": "3"})
    assert "'Demo'" in spelling_problem(manifest, {"Demo:latest": "4"})
