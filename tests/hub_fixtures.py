"""Fixtures for code that talks to the Hugging Face Hub: a test hub (tests/hub_server.py), a tiny model published on
it, and huggingface_hub pointed at it with nothing allowed off this machine. conftest.py imports the fixtures.

- `hub_server` (session): the running `HubTestServer`; `hub`: the same with its log and faults cleared.
- `hub_model`: a fresh repo per test holding the tiny Phi-3 as `PublishedModel` (two commits on main, a tag, decoys).
- `hf_env`: huggingface_hub as if HF_ENDPOINT et al. had been set before it was imported (see `point_hf_at`),
  inside `loopback_only`; the test fails if any name lookup left loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.hub_repos import HubRepo, folder_files
from tests.hub_server import HubTestServer

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
TAG = "v1.0"
# Files a bake must never fetch: other weight formats next to the safetensors, as real repos have them.
DECOYS = {
    "pytorch_model.bin": b"decoy: a bake must not fetch pytorch_model.bin\n" * 64,
    "model.pth": b"decoy: a bake must not fetch model.pth\n" * 64,
    "onnx/model.onnx": b"decoy: a bake must not fetch onnx/model.onnx\n" * 64,
}
README = "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny-phi3\nA tiny random Phi-3 for tests.\n"
_repo_numbers = itertools.count()


@dataclass
class PublishedModel:
    """A tiny model on the test hub: `first` (tagged TAG) is the model as written; `second` changes the weights of
    `weights[0]` and is where main points."""

    repo: HubRepo
    first: str
    second: str
    weights: list[str]
    tag: str = TAG
    decoys: list[str] = field(default_factory=lambda: sorted(DECOYS))

    @property
    def repo_id(self) -> str:
        return self.repo.repo_id

    def sha256(self, path: str, revision: str = "main") -> str:
        """Hashed from the bytes stored, not from the metadata the server reports."""
        return hashlib.sha256(self.repo.read(path, revision)).hexdigest()


def changed_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its first stored value nudged: the low byte of a little-endian float is
    mantissa, so the value stays finite whatever the dtype."""
    start = 8 + struct.unpack("<Q", data[:8])[0]
    return data[:start] + bytes([data[start] ^ 1]) + data[start + 1:]


def publish_tiny_model(repo: HubRepo, model_dir: Path) -> PublishedModel:
    files = folder_files(model_dir)
    weights = sorted(p for p in files if p.endswith(".safetensors"))
    first = repo.commit({**files, **DECOYS, "README.md": README}, message="Add tiny model", replace=True)
    repo.tag(TAG, first)
    second = repo.commit({weights[0]: changed_safetensors(files[weights[0]].read_bytes())}, message="Update weights")
    return PublishedModel(repo, first, second, weights)


@contextlib.contextmanager
def loopback_only() -> Iterator[list[str]]:
    """Refuse every name lookup that is not loopback and list it. huggingface_hub swallows many network errors (it
    falls back to its cache, or drops telemetry), so the list, not the refusal, is what a test checks."""
    offsite: list[str] = []
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in LOOPBACK:
            offsite.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"test: {name} is not loopback")
        return real(host, *args, **kwargs)

    socket.getaddrinfo = guarded
    try:
        yield offsite
    finally:
        socket.getaddrinfo = real


def hf_environ(endpoint: str, home: Path) -> dict[str, str]:
    """The environment that keeps huggingface_hub on `endpoint`: no telemetry, no Xet, nothing from the user's
    HF_HOME (token, caches)."""
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost"}


# Variables that would send huggingface_hub elsewhere, offline, or with a credential of the user.
HF_UNSET = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE",
            "HF_TOKEN_PATH", "HF_HUB_ENABLE_HF_TRANSFER")


def point_hf_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Set `hf_environ` for subprocesses, and mirror it into the huggingface_hub already imported: its constants
    (and its module-level HfApi) were read at import time, so setting HF_ENDPOINT afterwards changes nothing."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import close_session

    for name in HF_UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in hf_environ(endpoint, home).items():
        monkeypatch.setenv(name, value)
    for name, value in {"ENDPOINT": endpoint,
                        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
                        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_XET": True,
                        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False, "HF_HOME": str(home),
                        "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
                        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json")}.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    close_session()  # the shared client pools connections (and proxy settings) from before


@dataclass
class HfEnv:
    endpoint: str
    cache_dir: Path
    offsite: list[str]


# --- fixtures --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def hub_server(tmp_path_factory) -> Iterator[HubTestServer]:
    server = HubTestServer(tmp_path_factory.mktemp("hub") / "repos")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server) -> Iterator[HubTestServer]:
    """The shared test hub, with an empty request log and no faults, before and after the test."""
    hub_server.reset()
    yield hub_server
    hub_server.reset()


@pytest.fixture
def hub_model(hub, tiny_model, request) -> PublishedModel:
    """A fresh repo (the test may move its branches or gate it) holding a tiny Phi-3 (hidden 64, 2 layers)."""
    name = re.sub(r"[^\w.-]+", "-", request.node.name)[:60].strip("-.")
    repo = hub.hub.create_repo(f"so8t-test/{name}-{next(_repo_numbers)}")
    return publish_tiny_model(repo, tiny_model("phi3", num_layers=2))


@pytest.fixture
def hf_env(hub, tmp_path, monkeypatch) -> Iterator[HfEnv]:
    """huggingface_hub on the test hub, a fresh cache and HF_HOME, and no name lookup off loopback."""
    from huggingface_hub.utils import close_session

    home = tmp_path / "hf-home"
    point_hf_at(monkeypatch, hub.url, home)
    with loopback_only() as offsite:
        yield HfEnv(hub.url, home / "hub", offsite)
    close_session()
    assert not offsite, f"huggingface_hub tried to reach {offsite} (only loopback is allowed)"
