"""A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution 2.8) on loopback.

    with Registry(tmp_path / "registry") as registry:      # or .start() / .stop()
        registry.url                                        # http://127.0.0.1:PORT
        digest = registry.push_image("ns/model", "tag", [(media_type, data), ...], config_bytes)

`Registry(root, location_header=True, auth=None, realm="basic-realm")` writes its configuration (from
tests/registry_config.yml) to ROOT.yml, keeps its storage in ROOT (storage.filesystem.rootdirectory, deletes
enabled) and its own log in ROOT.log, listens on 127.0.0.1 on a free port, and is ready once `GET /v2/` answers.
- location_header: distribution's `http.headers: {Location: ["?"]}`, so that a blob GET answers 200 with a
  Location header, which Ollama's puller requires; False reproduces ollama#7244 ("no Location header").
- auth=(user, password): htpasswd (bcrypt) authentication with that one user; `registry.auth` is then the pair
  for httpx. Ollama's /api/pull never sends basic credentials, so a host cannot pull from such a registry.
`stop()` ends only this registry's own process. The push helpers use plain httpx, as any client would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.server_process import end_process

BINARY = "docker-registry"
INSTALL_HINT = "apt-get install docker-registry"
CONFIG_TEMPLATE = Path(__file__).with_name("registry_config.yml")
MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"
TEST_AUTH = ("so8t", "registry-test-password")  # the auth_registry fixture's user


def registry_available() -> bool:
    return shutil.which(BINARY) is not None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Registry:
    __test__ = False  # not a pytest test class

    def __init__(self, root: Path, *, location_header: bool = True, auth: tuple[str, str] | None = None,
                 realm: str = "basic-realm"):
        self.root = Path(root)
        self.location_header, self.auth, self.realm = location_header, auth, realm
        self.config_path = self.root.with_name(self.root.name + ".yml")
        self.log_path = self.root.with_name(self.root.name + ".log")
        self.proc: subprocess.Popen | None = None
        self.url = ""

    # -- the process --

    def config(self, port: int) -> dict:
        config = yaml.safe_load(CONFIG_TEMPLATE.read_text())
        config["http"]["addr"] = f"127.0.0.1:{port}"
        config["storage"]["filesystem"]["rootdirectory"] = str(self.root)
        if not self.location_header:
            del config["http"]["headers"]["Location"]
        if self.auth is not None:
            import bcrypt

            user, password = self.auth
            htpasswd = self.root.with_name(self.root.name + ".htpasswd")
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            htpasswd.write_text(f"{user}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": self.realm, "path": str(htpasswd)}}
        return config

    def start(self, timeout: float = 30) -> str:
        """Start docker-registry and wait until `GET /v2/` answers; returns the base URL."""
        if self.proc is not None:
            raise RuntimeError(f"already running at {self.url}")
        if not registry_available():
            raise RuntimeError(f"{BINARY} is not installed ({INSTALL_HINT})")
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a free port can be taken between the probe and the registry's bind
            port = _free_port()
            self.config_path.write_text(yaml.safe_dump(self.config(port), sort_keys=False))
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen([BINARY, "serve", str(self.config_path)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
            self.url = f"http://127.0.0.1:{port}"
            if self._wait_ready(timeout):
                return self.url
            self.stop()
        raise RuntimeError(f"{BINARY} did not start; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/", timeout=2).status_code in (200, 401):
                    return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests look at --

    @property
    def host(self) -> str:
        """HOST:PORT, the first part of an Ollama model name on this registry."""
        return self.url.removeprefix("http://")

    def blob_file(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob's bytes (to corrupt one behind its back)."""
        hex_digest = digest.removeprefix("sha256:")
        return self.root / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_digest[:2] / hex_digest / "data"

    # -- pushing, as any registry client does --

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=timeout)

    def push_blob(self, repo: str, data: bytes) -> str:
        """POST an upload, then PUT the bytes with their digest (distribution ignores a body on the POST)."""
        digest = sha256_digest(data)
        with self.client() as http:
            if http.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
                return digest
            started = http.post(f"/v2/{repo}/blobs/uploads/")
            started.raise_for_status()
            location = started.headers["location"]
            location += ("&" if "?" in location else "?") + "digest=" + digest
            done = http.put(location, content=data,
                            headers={"Content-Type": "application/octet-stream"})
            done.raise_for_status()
        return digest

    def push_manifest(self, repo: str, tag: str, manifest: bytes) -> str:
        """PUT a Docker v2 manifest under a tag; returns the registry's Docker-Content-Digest."""
        with self.client() as http:
            r = http.put(f"/v2/{repo}/manifests/{tag}", content=manifest, headers={"Content-Type": MANIFEST_MEDIA})
            r.raise_for_status()
            return r.headers["docker-content-digest"]

    def push_image(self, repo: str, tag: str, layers: list[tuple[str, bytes]], config: bytes) -> tuple[str, bytes]:
        """Push the layers (media type, bytes) and the config (application/vnd.docker.container.image.v1+json),
        then the manifest; returns (manifest digest, manifest bytes)."""
        entries = [{"mediaType": media, "digest": self.push_blob(repo, data), "size": len(data)}
                   for media, data in layers]
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA,
                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                               "digest": self.push_blob(repo, config), "size": len(config)},
                    "layers": entries}
        data = json.dumps(manifest, separators=(",", ":")).encode()
        return self.push_manifest(repo, tag, data), data

    def delete_manifest(self, repo: str, digest: str) -> None:
        with self.client() as http:
            http.delete(f"/v2/{repo}/manifests/{digest}").raise_for_status()
