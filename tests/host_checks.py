"""What tests read off an Ollama host: its models and digests, the requests it received, and its blob store."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import ollama

from so8t_deploy.external.ollama_host import tls_context

CHANGES = {("POST", "/api/create"), ("POST", "/api/copy"), ("DELETE", "/api/delete")}


def tag_digests(url: str) -> dict[str, str]:
    """Every model on a host with its manifest digest, as /api/tags lists them."""
    return {m.model: m.digest for m in ollama.Client(host=url, timeout=30, verify=tls_context()).list().models}


def requests_seen(url: str) -> list[dict]:
    return httpx.get(f"{url}/_test/requests", timeout=30, verify=tls_context()).raise_for_status().json()["requests"]


def changes_seen(url: str) -> list[str]:
    """Every request that changed (or tried to change) the host's models or blobs, as 'METHOD PATH'."""
    return [f"{r['method']} {r['path']}" for r in requests_seen(url)
            if (r["method"], r["path"]) in CHANGES or (r["method"] == "POST" and r["path"].startswith("/api/blobs/"))]


def creates_by_model(url: str) -> Counter:
    """Creates per tag: every create is of the tag's candidate (`TAG-candidate`), promoted once tested."""
    return Counter(r["body"]["model"].removesuffix("-candidate") for r in requests_seen(url)
                   if r["method"] == "POST" and r["path"] == "/api/create")


def unreferenced_blobs(store: Path) -> set[str]:
    """Blobs ('sha256:...') of an Ollama models directory that no manifest references."""
    referenced: set[str] = set()
    for path in (store / "manifests").rglob("*"):
        if path.is_file():
            manifest = json.loads(path.read_text())
            referenced |= {layer["digest"] for layer in [manifest["config"], *manifest["layers"]]}
    blobs = {p.name.replace("-", ":", 1) for p in (store / "blobs").iterdir()}
    return blobs - referenced


def wait_for(predicate, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
