"""One Ollama server, through the official `ollama` client plus plain HTTP where the client lacks a call.

Both paths share one transport built here: the manifest's headers and nothing else (the client
would add the operator's OLLAMA_API_KEY to every host on its own), explicit timeouts (the
client's default is none), and no redirects (a redirected POST is never what a deploy wants).
Every error is translated here, once, into a HostError naming the host; header values never
appear in messages or logs.

Idempotent calls (version, list, show, blob HEAD/upload, copy, delete) are retried with backoff
on connection errors, timeouts and 5xx. A create never is: on current Ollama it can stay silent
for minutes while the server rewrites the GGUF, and a create sent twice is two rewrites. When a
create's outcome is unknown (the connection dropped, the long read timeout passed) it raises
CreateOutcomeUnknown and the caller re-observes the host instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama
from packaging.version import InvalidVersion, Version

from .. import __version__
from ..errors import HostError, HostUnreachableError
from .ollama_show import ShownModel

MIN_VERSION = Version("0.5.5")  # the first server that accepts create with `files` digests
SOURCE_BUILD_VERSION = "0.0.0"  # what a server built from source reports
UPLOAD_CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 10.0
# A create has its own read timeout: current Ollama pipes the GGUF through llama-quantize and
# then copies and hashes it with no status line at all, minutes for a multi-GB f16. The wait is
# scaled to the file: 10 minutes plus one second per 8 MiB (a 7.6 GB GGUF gets about 25 minutes).
CREATE_BASE_TIMEOUT_S = 600.0
CREATE_BYTES_PER_SECOND = 8 << 20
T = TypeVar("T")


def create_read_timeout(size: int) -> float:
    """The longest silence a create of a `size`-byte GGUF is allowed, in seconds."""
    return CREATE_BASE_TIMEOUT_S + size / CREATE_BYTES_PER_SECOND


class CreateFailed(HostError):
    """The server refused or aborted a create (an HTTP error, or an error line in its stream)."""


class CreateOutcomeUnknown(HostError):
    """The create request was sent, but its answer was lost: the host must be re-observed."""


class GenerateFailed(HostError):
    """The server answered a generation with an error (typically: the model did not load or run)."""


class GenerateTimedOut(HostError):
    """No answer to a generation within its timeout."""


class _Transient(Exception):
    """A failure worth retrying (the original is kept as __cause__)."""

    def __init__(self, message: str, *, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable  # no answer at all, as opposed to a server error


class OllamaHost:
    def __init__(self, name: str, url: str, headers: dict[str, str] | None = None, *, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.5):
        self.name, self.url = name, url
        self._headers = dict(headers or {})
        self._timeout, self._retries, self._backoff = timeout, retries, backoff
        self.warnings: list[str] = []
        self.http = self._transport(timeout)
        self.client = self._ollama_client(self.http)

    def _transport(self, read_timeout: float | None) -> httpx.Client:
        """The one way this module talks HTTP: our headers only, explicit timeouts, no redirects."""
        return httpx.Client(base_url=self.url, headers={"User-Agent": f"so8t-deploy/{__version__}", **self._headers},
                            timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S), follow_redirects=False)

    def _ollama_client(self, transport: httpx.Client) -> ollama.Client:
        client = ollama.Client(host=self.url)
        # The client builds its own httpx client, adding OLLAMA_API_KEY from the environment as a
        # bearer token for every host; replace it with ours so both paths send the same headers.
        client._client.close()
        client._client = transport
        return client

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OllamaHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never the headers
        return f"OllamaHost({self.name!r}, {self.url!r})"

    def _error(self, what: str, message: str, kind: type[HostError] = HostError) -> HostError:
        return kind(f"{self.name} ({self.url}): {what}: {message}")

    # -- error translation and retries ---------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delay = self._backoff
        for attempt in range(1, self._retries + 1):
            try:
                return self._translate(what, fn)
            except _Transient as e:
                if attempt == self._retries:
                    kind = HostUnreachableError if e.unreachable else HostError
                    raise self._error(what, str(e), kind) from e.__cause__
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _translate(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ollama.ResponseError as e:
            if e.status_code >= 500:
                raise _Transient(f"HTTP {e.status_code}: {_short(e.error)}", unreachable=False) from e
            suffix = " (in the response stream)" if e.status_code == -1 else f" (HTTP {e.status_code})"
            raise self._error(what, f"{_short(e.error)}{suffix}") from e
        except httpx.HTTPStatusError as e:
            message = _error_text(e.response)
            if e.response.status_code >= 500:
                raise _Transient(f"HTTP {e.response.status_code}: {message}", unreachable=False) from e
            raise self._error(what, f"{message} (HTTP {e.response.status_code})") from e
        except (httpx.TransportError, ConnectionError, TimeoutError) as e:
            raise _Transient(f"unreachable ({_transport_reason(e)})", unreachable=True) from e
        except (ValueError, KeyError, TypeError) as e:  # a 200 that is not Ollama's JSON
            raise self._error(what, "not an Ollama server (unexpected response body)") from e

    # -- calls -----------------------------------------------------------------------------------

    def version(self) -> str:
        def call() -> str:
            response = self.http.get("/api/version")
            if response.is_redirect:
                raise self._error("version", f"not an Ollama server: /api/version redirects to "
                                  f"{response.headers.get('location', '?')} (use that URL as the host)")
            if response.status_code == 404 or not _is_json(response):
                raise self._error("version", f"not an Ollama server (GET /api/version answered HTTP "
                                  f"{response.status_code}, {response.headers.get('content-type', 'no content type')})")
            response.raise_for_status()
            version = response.json().get("version")
            if not isinstance(version, str):
                raise self._error("version", "not an Ollama server (no version in /api/version)")
            return version

        return self._call("version", call)

    def check_version(self) -> str:
        text = self.version()
        try:
            version = Version(text)
        except InvalidVersion:
            version = None
        if version is None or version == Version(SOURCE_BUILD_VERSION):
            self.warnings.append(f"{self.name}: Ollama reports version {text!r} (a source build?); "
                                 f"assuming it is at least {MIN_VERSION}")
        elif version < MIN_VERSION:
            raise self._error("version", f"Ollama {text} is too old: creating models from uploaded GGUF "
                              f"digests needs Ollama >= {MIN_VERSION}; upgrade the server")
        return text

    def tags(self) -> dict[str, str]:
        """{model name with tag: manifest digest}."""
        response = self._call("list models", self.client.list)
        return {m.model: m.digest for m in response.models if m.model and m.digest}

    def show(self, model: str) -> ShownModel | None:
        """/api/show, typed (over plain HTTP: the client's ShowResponse drops `system`); None if absent."""

        def call() -> ShownModel | None:
            response = self.http.post("/api/show", json={"model": model})
            if response.status_code == 404:
                return None
            response.raise_for_status()
            shown = response.json()
            if not isinstance(shown, dict):
                raise ValueError("not a JSON object")
            return ShownModel.from_json(shown)

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
            response = self.http.post(f"/api/blobs/{digest}", content=chunks(), headers={"Content-Length": str(size)})
            if response.status_code == 400 and "digest" in _error_text(response):
                raise self._error(f"upload {path.name}", f"the server computed a different digest than {digest} "
                                  "(file changed or corrupted in transit)")
            response.raise_for_status()
            return size if response.status_code == 201 else 0

        return self._call(f"upload {path.name}", call)

    def create(self, model: str, files: dict[str, str], template: str, system: str | None,
               parameters: dict[str, Any], *, size: int, on_status: Callable[[str], None] | None = None) -> None:
        """Create `model` and wait for it as long as the file's size warrants; never re-sent.

        A refused connection (nothing was sent) is retried; anything after the request left
        raises CreateFailed (the server said no) or CreateOutcomeUnknown (the answer was lost).
        """
        what = f"create {model}"
        for attempt in range(1, self._retries + 1):
            with self._transport(create_read_timeout(size)) as transport:
                client = self._ollama_client(transport)
                try:
                    return self._stream_create(client, what, model, files, template, system, parameters, on_status)
                except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                    if attempt == self._retries:
                        raise self._error(what, f"unreachable ({_transport_reason(e)})", HostUnreachableError) from e
                time.sleep(self._backoff * 2 ** (attempt - 1))

    def _stream_create(self, client: ollama.Client, what: str, model: str, files: dict[str, str], template: str,
                       system: str | None, parameters: dict[str, Any],
                       on_status: Callable[[str], None] | None) -> None:
        last = None
        try:
            for status in client.create(model=model, files=files, template=template, system=system,
                                        parameters=parameters, stream=True):
                last = status.status
                if on_status and last:
                    on_status(last)
        except ollama.ResponseError as e:
            where = " (in the response stream)" if e.status_code == -1 else f" (HTTP {e.status_code})"
            raise self._error(what, f"{_short(e.error)}{where}", CreateFailed) from e
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise
        except (httpx.TransportError, ConnectionError, TimeoutError) as e:
            raise self._error(what, f"the answer was lost ({_transport_reason(e)})", CreateOutcomeUnknown) from e
        except ValueError as e:  # a line that is not JSON
            raise self._error(what, "not an Ollama server (unexpected response body)", CreateFailed) from e
        if last != "success":
            raise self._error(what, f"the stream ended with {last!r}, not 'success'", CreateOutcomeUnknown)

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

    def generate(self, model: str, prompt: str, options: dict[str, Any], keep_alive: float | str,
                 timeout: float) -> ollama.GenerateResponse:
        """One non-streamed generation, bounded by `timeout` seconds; not retried (a smoke test measures it)."""
        what = f"generate with {model}"
        with self._transport(timeout) as transport:
            client = self._ollama_client(transport)
            try:
                return self._translate(what, lambda: client.generate(
                    model=model, prompt=prompt, options=options, keep_alive=keep_alive, stream=False))
            except _Transient as e:
                if isinstance(e.__cause__, httpx.TimeoutException | TimeoutError):
                    raise self._error(what, f"no answer within {timeout:g} s", GenerateTimedOut) from e.__cause__
                kind = HostUnreachableError if e.unreachable else GenerateFailed
                raise self._error(what, str(e), kind) from e.__cause__
            except HostError as e:
                raise GenerateFailed(str(e)) from e


def _transport_reason(e: BaseException) -> str:
    if isinstance(e, httpx.TimeoutException | TimeoutError):
        return "timed out"
    if isinstance(e, httpx.ConnectError | ConnectionError):
        return "connection refused or host not found"
    return type(e).__name__


def _short(text: object, limit: int = 300) -> str:
    """The first line of a server's message, bounded (a proxy's HTML error page is not a message)."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else "no message"
    if line.lstrip().startswith("<"):
        return "an HTML page instead of an Ollama answer"
    return line[:limit]


def _is_json(response: httpx.Response) -> bool:
    return "json" in response.headers.get("content-type", "")


def _error_text(response: httpx.Response) -> str:
    try:
        response.read()
        return _short(response.json().get("error", response.text))
    except (ValueError, AttributeError, httpx.HTTPError):
        return _short(response.text) if hasattr(response, "text") else "error"


__all__ = ["CreateFailed", "CreateOutcomeUnknown", "GenerateFailed", "GenerateTimedOut", "OllamaHost",
           "create_read_timeout"]
