"""One Ollama server, through the official `ollama` client plus plain HTTP where the client lacks a call.

Both paths share one transport built here: the manifest's headers and nothing else (the client
would add the operator's OLLAMA_API_KEY to every host on its own), explicit timeouts (the
client's default is none), and no redirects (a redirected POST is never what a deploy wants).
Every error is translated here, once, into a HostError naming the host; header values never
appear in messages or logs.

Idempotent calls (version, list, show, blob HEAD/upload, copy, delete) are retried with backoff
on connection errors, timeouts and 5xx. A create never is. It is sent with `"stream": false`:
Ollama hands a streamed create's status lines to the handler over an unbuffered channel, so a
streamed create whose client went away (a proxy cutting an idle connection while the server
copies and hashes a multi-GB GGUF, silently) blocks forever before it writes its manifest, while
a non-streamed one completes whatever the client does. When its answer is lost (a dropped
connection, a proxy's 502/503/504, the long read timeout), the host is polled (/api/tags) for the
model until the create's deadline: the connection dropping never means the create failed.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
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

# A create has its own deadline: current Ollama pipes the GGUF through llama-quantize and then
# copies and hashes it with no answer at all, minutes for a multi-GB f16. The deadline is scaled
# to the file: 10 minutes plus one second per 8 MiB (a 7.6 GB GGUF gets about 25 minutes). It is
# both the create's read timeout and, when the answer is lost, how long /api/tags is polled.
CREATE_BASE_TIMEOUT_S = 600.0
CREATE_BYTES_PER_SECOND = 8 << 20
CREATE_POLL_FIRST_S = 1.0  # the first pause between polls after a lost answer; it grows to CREATE_POLL_MAX_S
CREATE_POLL_MAX_S = 15.0
# What a reverse proxy answers when the server behind it went silent or away: the create may still land.
GATEWAY_STATUSES = (502, 503, 504)
T = TypeVar("T")


def create_read_timeout(size: int) -> float:
    """The create deadline of a `size`-byte GGUF, in seconds: the longest it may take to appear."""
    return CREATE_BASE_TIMEOUT_S + size / CREATE_BYTES_PER_SECOND


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings of every HTTP client this package makes: httpx's defaults (certifi's CA bundle, or
    SSL_CERT_FILE / SSL_CERT_DIR), loaded once per process. httpx loads the bundle again for each client it
    makes without one (17 ms of CPU here), and a fleet apply makes several clients per host; an SSLContext is
    safe to share between clients and threads."""
    return httpx.create_ssl_context()


@dataclass(frozen=True)
class Clock:
    """Time as the host adapter waits on it; tests pass a faster one, or replace DEFAULT_CLOCK."""

    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


# The clock of every OllamaHost and RegistryClient made without one, looked up when each is made: the real one.
# Tests that only need a retry to happen, not its pause, swap in a clock whose sleep returns at once (its
# monotonic moves on by as much), so no test waits out a backoff (tests/conftest.py, `instant_retries`).
DEFAULT_CLOCK = Clock()


def default_clock() -> Clock:
    return DEFAULT_CLOCK


class CreateFailed(HostError):
    """The server refused or aborted a create, or the model never appeared after its answer was lost."""


class PullFailed(HostError):
    """The host could not pull a model from its registry (it said why, or the pull never finished)."""


class GenerateFailed(HostError):
    """The server answered a generation with an error (typically: the model did not load or run)."""


class GenerateTimedOut(HostError):
    """No answer to a generation within its timeout."""


class _Transient(Exception):
    """A failure worth retrying (the original is kept as __cause__)."""

    def __init__(self, message: str, *, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable  # no answer at all, as opposed to a server error


class _ExactHeaders(httpx.Auth):
    """Sends exactly these headers. ollama.Client adds its own User-Agent, and OLLAMA_API_KEY from the
    environment as a bearer token for every host: an operator's ollama.com key would reach each target."""

    def __init__(self, headers: httpx.Headers):
        self.headers = httpx.Headers(headers)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.pop("authorization", None)
        request.headers.update(self.headers)
        yield request


@dataclass(frozen=True)
class CreateRequest:
    """One /api/create: the model's name, its files (file name -> blob digest), and the Modelfile's template,
    system prompt and parameters."""

    model: str
    files: dict[str, str]
    template: str
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


class OllamaHost:
    def __init__(self, name: str, url: str, headers: dict[str, str] | None = None, *, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.5, clock: Clock | None = None):
        self.name, self.url = name, url
        self._headers = dict(headers or {})
        self._timeout, self._retries, self._backoff = timeout, retries, backoff
        self._clock = clock or default_clock()
        self.warnings: list[str] = []
        self.http = self._transport(timeout)
        self.client = self._ollama_client(self.http)

    def _transport(self, read_timeout: float | None) -> httpx.Client:
        """The one way this module talks HTTP: our headers only, explicit timeouts, no redirects."""
        return httpx.Client(base_url=self.url, headers={"User-Agent": f"so8t-deploy/{__version__}", **self._headers},
                            timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S), follow_redirects=False,
                            verify=tls_context())

    def _ollama_client(self, transport: httpx.Client) -> ollama.Client:
        """The ollama client, sending what `transport` sends: the same headers, timeouts and no redirects."""
        return ollama.Client(host=self.url, follow_redirects=False, timeout=transport.timeout,
                             auth=_ExactHeaders(transport.headers), verify=tls_context())

    def close(self) -> None:
        self.client.close()
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
                self._clock.sleep(delay)
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

        def call() -> int:
            response = self.http.post(f"/api/blobs/{digest}", content=file_chunks(path, progress),
                                      headers={"Content-Length": str(size)})
            if response.status_code == 400 and "digest" in _error_text(response):
                raise self._error(f"upload {path.name}", f"the server computed a different digest than {digest} "
                                  "(file changed or corrupted in transit)")
            response.raise_for_status()
            return size if response.status_code == 201 else 0

        return self._call(f"upload {path.name}", call)

    def create(self, request: CreateRequest, *, size: int) -> None:
        """Create `model` with `"stream": false` and return once the host holds it; never sent twice.

        Only a refused connection (nothing was sent) is retried. A create the server refuses raises
        CreateFailed; one whose answer is lost is waited for in /api/tags until its deadline.
        """
        model = request.model
        what, deadline = f"create {model}", create_read_timeout(size)
        started = self._clock.monotonic()
        for attempt in range(1, self._retries + 1):
            with self._transport(deadline) as transport:
                try:
                    lost = self._send_create(self._ollama_client(transport), what, request)
                except (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout) as e:
                    if attempt == self._retries:
                        raise self._error(what, f"unreachable ({_transport_reason(e)})", HostUnreachableError) from e
                    self._clock.sleep(self._backoff * 2 ** (attempt - 1))
                    continue
            if lost is not None:
                self._await_model(what, model, lost, started + deadline)
            return

    def _send_create(self, client: ollama.Client, what: str, request: CreateRequest) -> str | None:
        """Send the create once; None when the server answered success, else why the answer is unknown."""
        try:
            response = client.create(model=request.model, files=request.files, template=request.template,
                                     system=request.system, parameters=request.parameters, stream=False)
        except ollama.ResponseError as e:
            if e.status_code in GATEWAY_STATUSES:  # a proxy's answer: the server behind it may be at work
                return f"HTTP {e.status_code}: {_short(e.error)}"
            raise self._error(what, f"{_short(e.error)} (HTTP {e.status_code})", CreateFailed) from e
        except (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout):
            raise
        except (httpx.TransportError, TimeoutError) as e:
            return f"the connection {'timed out' if isinstance(e, httpx.TimeoutException) else 'dropped'}"
        except ValueError as e:  # a body that is not JSON
            raise self._error(what, "not an Ollama server (unexpected response body)", CreateFailed) from e
        status = getattr(response, "status", None)
        return None if status == "success" else f"it answered {status!r}, not 'success'"

    def _await_model(self, what: str, model: str, lost: str, until: float) -> None:
        """After a lost answer: poll /api/tags until `model` is listed, or raise CreateFailed at `until`."""
        pause, wanted = CREATE_POLL_FIRST_S, model.lower()
        while True:
            try:
                if wanted in (name.lower() for name in self.tags()):
                    return
            except HostError:
                pass  # the host may be busy or restarting: the deadline decides
            now = self._clock.monotonic()
            if now >= until:
                raise self._error(what, f"the answer was lost ({lost}) and the model did not appear in /api/tags "
                                  "before the create's deadline", CreateFailed)
            self._clock.sleep(min(pause, until - now))
            pause = min(pause * 1.5, CREATE_POLL_MAX_S)

    def pull(self, model: str, *, insecure: bool, size: int, progress: Callable[[int], None] | None = None,
             check: Callable[[], None] | None = None) -> None:
        """Pull `model` (HOST/NAMESPACE/NAME:TAG) from its registry, streamed, and return once the host wrote its
        manifest; `progress(n)` gets the bytes fetched as they come, and `check()` is called at every line: what it
        raises (an interrupt) ends the request, which cancels the pull on the host (its partial blobs stay, for
        the next pull to resume).

        What the host reports (an HTTP error, or an error line in the stream: a registry it cannot read, a blob
        whose digest does not match) raises PullFailed. A connection that drops, or a proxy's gateway answer, is
        retried: a pull is idempotent (blobs already there are skipped, a partial one resumes). The read timeout
        is a create's: the host hashes every fetched blob in silence before it writes the manifest.
        """
        what = f"pull {model}"
        seen: dict[str, int] = {}  # digest -> bytes fetched, so far reported
        lost = ""
        kind: type[HostError] = PullFailed
        for attempt in range(1, self._retries + 1):
            if attempt > 1:
                self._clock.sleep(self._backoff * 2 ** (attempt - 2))
            with self._transport(create_read_timeout(size)) as transport:
                try:
                    status = None
                    for update in self._ollama_client(transport).pull(model, insecure=insecure, stream=True):
                        if check is not None:
                            check()
                        status = update.status
                        if progress and update.digest and update.completed:
                            progress(max(0, update.completed - seen.get(update.digest, 0)))
                            seen[update.digest] = max(update.completed, seen.get(update.digest, 0))
                    if status == "success":
                        return
                    lost = f"the stream ended with {status!r}, not 'success'"
                except ollama.ResponseError as e:
                    if e.status_code not in GATEWAY_STATUSES:
                        where = " (in the response stream)" if e.status_code == -1 else f" (HTTP {e.status_code})"
                        raise self._error(what, f"{_short(e.error)}{where}", PullFailed) from e
                    lost, kind = f"HTTP {e.status_code}: {_short(e.error)}", PullFailed
                except (httpx.TransportError, ConnectionError, TimeoutError) as e:
                    lost = f"unreachable ({_transport_reason(e)})"
                    kind = HostUnreachableError if isinstance(e, httpx.ConnectError | ConnectionError) else PullFailed
                except (ValueError, TypeError) as e:
                    raise self._error(what, "not an Ollama server (unexpected response body)", PullFailed) from e
        raise self._error(what, f"no success after {self._retries} attempts ({lost})", kind)

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

    def render_chat(self, model: str, messages: list[dict[str, Any]], timeout: float, *,
                    think: bool | None = None) -> str | None:
        """The prompt the host renders for this conversation, without generating (Ollama's `_debug_render_only`
        on /api/chat, answered once the model is loaded), with the request's `think` unless it is None; None when
        the host does not know the option (an older Ollama answers with a generation, which `num_predict: 1`
        keeps short). Fails as a generation does."""
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": False, "_debug_render_only": True,
                                "options": {"num_predict": 1}}
        if think is not None:
            body["think"] = think

        def call(transport: httpx.Client) -> str | None:
            response = transport.post("/api/chat", json=body)
            response.raise_for_status()
            answer = response.json()
            if not isinstance(answer, dict):
                raise ValueError("not a JSON object")
            debug = answer.get("_debug_info")
            rendered = debug.get("rendered_template") if isinstance(debug, dict) else None
            return rendered if isinstance(rendered, str) else None

        return self._run_model(f"render a conversation with {model}", timeout, call)

    def generate(self, model: str, prompt: str, options: dict[str, Any], keep_alive: float | str,
                 timeout: float, *, think: bool | None = None) -> ollama.GenerateResponse:
        """One non-streamed generation, bounded by `timeout` seconds; not retried (a smoke test measures it)."""
        return self._run_model(f"generate with {model}", timeout, lambda transport: self._ollama_client(
            transport).generate(model=model, prompt=prompt, options=options, keep_alive=keep_alive, stream=False,
                                think=think))

    def _run_model(self, what: str, timeout: float, fn: Callable[[httpx.Client], T]) -> T:
        """One request that loads and runs a model, bounded by `timeout` seconds and not retried: GenerateTimedOut,
        GenerateFailed (the host answered with an error), or HostUnreachableError."""
        with self._transport(timeout) as transport:
            try:
                return self._translate(what, lambda: fn(transport))
            except _Transient as e:
                if isinstance(e.__cause__, httpx.TimeoutException | TimeoutError):
                    raise self._error(what, f"no answer within {timeout:g} s", GenerateTimedOut) from e.__cause__
                kind = HostUnreachableError if e.unreachable else GenerateFailed
                raise self._error(what, str(e), kind) from e.__cause__
            except HostError as e:
                raise GenerateFailed(str(e)) from e


def file_chunks(path: Path, progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """A file as an upload body, UPLOAD_CHUNK bytes at a time, each reported to `progress` as it is read."""
    with open(path, "rb") as f:
        while chunk := f.read(UPLOAD_CHUNK):
            if progress:
                progress(len(chunk))
            yield chunk


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


__all__ = ["DEFAULT_CLOCK", "Clock", "CreateFailed", "GenerateFailed", "GenerateTimedOut", "OllamaHost", "PullFailed",
           "create_read_timeout", "tls_context"]
