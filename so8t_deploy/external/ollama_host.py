"""One Ollama server, through the official `ollama` client plus plain HTTP where the client lacks a call.

Every call has an explicit timeout (the client's default is none), transient failures
(connection errors, 5xx, timeouts) are retried with backoff, and every error is translated
here, once, into a HostError naming the host. Header values (tokens) never appear in
messages or logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama

from ..errors import HostError

MIN_VERSION = (0, 5, 5)  # the first server that accepts create with `files` digests
UPLOAD_CHUNK = 1 << 20
T = TypeVar("T")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class _Transient(Exception):
    """A failure worth retrying (the original is kept as __cause__)."""


class OllamaHost:
    def __init__(self, name: str, url: str, headers: dict[str, str] | None = None, *, timeout: float = 30.0,
                 upload_timeout: float = 600.0, retries: int = 3, backoff: float = 0.5):
        self.name, self.url = name, url
        self._headers = dict(headers or {})
        self._timeout, self._upload_timeout = timeout, upload_timeout
        self._retries, self._backoff = retries, backoff
        self.client = ollama.Client(host=url, timeout=timeout, headers=self._headers)
        self.http = httpx.Client(base_url=url, timeout=timeout, headers=self._headers)

    def close(self) -> None:
        self.http.close()
        self.client._client.close()  # the ollama client has no public close()

    def __repr__(self) -> str:  # never the headers
        return f"OllamaHost({self.name!r}, {self.url!r})"

    # -- error translation and retries ---------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delay = self._backoff
        for attempt in range(1, self._retries + 1):
            try:
                return self._translate(what, fn)
            except _Transient as e:
                if attempt == self._retries:
                    raise HostError(f"{self.name} ({self.url}): {what}: {e}") from e.__cause__
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _translate(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ollama.ResponseError as e:
            if e.status_code >= 500:
                raise _Transient(f"HTTP {e.status_code}: {e.error}") from e
            suffix = " (in the response stream)" if e.status_code == -1 else f" (HTTP {e.status_code})"
            raise HostError(f"{self.name} ({self.url}): {what}: {e.error}{suffix}") from e
        except httpx.HTTPStatusError as e:
            message = _error_text(e.response)
            if e.response.status_code >= 500:
                raise _Transient(f"HTTP {e.response.status_code}: {message}") from e
            raise HostError(f"{self.name} ({self.url}): {what}: {message} (HTTP {e.response.status_code})") from e
        except (httpx.TransportError, ConnectionError, TimeoutError) as e:
            raise _Transient(f"unreachable ({type(e).__name__}: {e})") from e

    # -- calls -----------------------------------------------------------------------------------

    def _get_json(self, method: str, path: str, **kwargs) -> Any:
        response = self.http.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()

    def version(self) -> str:
        return self._call("version", lambda: self._get_json("GET", "/api/version")["version"])

    def check_version(self) -> str:
        version = self.version()
        if _version_tuple(version) < MIN_VERSION:
            minimum = ".".join(map(str, MIN_VERSION))
            raise HostError(f"{self.name} ({self.url}): Ollama {version} is too old: creating models from "
                            f"uploaded GGUF digests needs Ollama >= {minimum}; upgrade the server")
        return version

    def tags(self) -> dict[str, str]:
        """{model name with tag: manifest digest}."""
        response = self._call("list models", self.client.list)
        return {m.model: m.digest for m in response.models if m.model}

    def show(self, model: str) -> dict | None:
        """/api/show as JSON (the client's ShowResponse drops `system`); None if the model is absent."""

        def call() -> dict | None:
            response = self.http.post("/api/show", json={"model": model})
            if response.status_code == 404:
                return None
            response.raise_for_status()
            return response.json()

        return self._call(f"show {model}", call)

    def has_blob(self, digest: str) -> bool:
        def call() -> bool:
            response = self.http.head(f"/api/blobs/{digest}")
            if response.status_code == 404:
                return False
            response.raise_for_status()
            return True

        return self._call("check blob", call)

    def upload_blob(self, path: Path, digest: str, progress: Callable[[int], None] | None = None) -> int:
        """Stream a file to the blob store (1 MiB at a time); return the bytes sent (0 if already there)."""
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(UPLOAD_CHUNK):
                    if progress:
                        progress(len(chunk))
                    yield chunk

        def call() -> int:
            response = self.http.post(f"/api/blobs/{digest}", content=chunks(), timeout=self._upload_timeout,
                                      headers={"Content-Length": str(size)})
            if response.status_code == 400 and "digest" in _error_text(response):
                raise HostError(f"{self.name} ({self.url}): upload of {path.name}: the server computed a "
                                f"different digest than {digest} (file changed or corrupted in transit)")
            response.raise_for_status()
            return size if response.status_code == 201 else 0

        return self._call(f"upload {path.name}", call)

    def create(self, model: str, files: dict[str, str], template: str, system: str | None,
               parameters: dict[str, Any]) -> None:
        def call() -> None:
            statuses = self.client.create(model=model, files=files, template=template, system=system,
                                          parameters=parameters, stream=True)
            last = None
            for status in statuses:
                last = status.status
            if last != "success":
                raise HostError(f"{self.name} ({self.url}): create {model}: ended with {last!r}, not 'success'")

        self._call(f"create {model}", call)

    def copy(self, source: str, destination: str) -> None:
        self._call(f"copy {source} to {destination}", lambda: self.client.copy(source, destination))

    def delete(self, model: str) -> bool:
        def call() -> bool:
            response = self.http.request("DELETE", "/api/delete", json={"model": model})
            if response.status_code == 404:
                return False
            response.raise_for_status()
            return True

        return self._call(f"delete {model}", call)

    def generate(self, model: str, prompt: str, options: dict[str, Any], timeout: float) -> ollama.GenerateResponse:
        """One non-streamed generation, bounded by `timeout` seconds; not retried (a smoke test measures it)."""

        def call() -> ollama.GenerateResponse:
            with ollama.Client(host=self.url, timeout=timeout, headers=self._headers) as client:
                return client.generate(model=model, prompt=prompt, options=options, stream=False)

        try:
            return self._translate(f"generate with {model}", call)
        except _Transient as e:
            raise HostError(f"{self.name} ({self.url}): generate with {model}: {e}") from e.__cause__


def _error_text(response: httpx.Response) -> str:
    try:
        response.read()
        return str(response.json().get("error", response.text))
    except (ValueError, AttributeError, httpx.HTTPError):
        return response.text[:200] if hasattr(response, "text") else "error"
