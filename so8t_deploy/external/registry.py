"""An OCI distribution registry (the Docker Registry HTTP API v2): what the controller pushes, and what a probe
can tell about the pulls Ollama hosts will make.

Pushing: a blob is uploaded once (HEAD first; a monolithic POST-then-PUT), then the manifest is PUT under its
tag; the registry's `Docker-Content-Digest` must be the sha256 of the bytes we sent. Credentials (basic, or a
bearer token fetched from the registry's realm with them) are sent only to the registry, never printed.

Ollama's puller (server/images.go, download.go, auth.go) is stricter than a Docker client, and the probe
checks exactly what it needs:
- it reads without credentials: anonymous reads, or a token realm on the registry's own host that hands an
  anonymous pull token out (Ollama refuses a realm on any other host);
- a blob GET must answer 200 or 307 *with a `Location` header* (ollama#7244): a registry that redirects to
  its storage does; CNCF distribution serving blobs itself does only with `http.headers: {Location: ["?"]}`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import httpx

from .. import __version__
from ..errors import RegistryError
from ..frozen import Frozen
from ..manifest.deploy_schema import Registry
from .ollama_host import CONNECT_TIMEOUT_S, Clock, _short, _transport_reason, default_clock, file_chunks, tls_context

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
# A blob upload's read timeout: the registry hashes the whole blob before it answers.
UPLOAD_BASE_TIMEOUT_S = 300.0
UPLOAD_BYTES_PER_SECOND = 8 << 20
MAX_SAME_HOST_REDIRECTS = 10  # what Ollama's puller follows (download.go)
T = TypeVar("T")


class _Retry(Exception):
    """A failure worth retrying: no answer, or a 5xx."""


class RegistryProbe(Frozen):
    """What a probe found out about the registry: one line per problem, None where all is well."""

    url: str
    repository: str
    reachable: bool
    anonymous_reads: bool | None = None  # None: not known (unreachable)
    location_header: bool | None = None  # blob answers carry Location; None: not known until a blob is published
    problem: str | None = None  # why hosts could not pull from it, in one line
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """('bearer', {realm, service, scope}) from a WWW-Authenticate header ('' when there is none)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for part in _split_params(rest):
        key, _, value = part.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return scheme.lower(), params


def _split_params(text: str) -> Iterator[str]:
    """The comma-separated parameters of a challenge; a comma inside quotes (a scope list) is kept."""
    current, quoted = "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            yield current
            current = ""
        else:
            current += char
    if current.strip():
        yield current


class RegistryClient:
    """One registry, as configured in the manifest's `distribution.registry`."""

    def __init__(self, registry: Registry, *, retries: int = 3, backoff: float = 0.5, clock: Clock | None = None):
        self.registry, self.url = registry, registry.url
        self._retries, self._backoff, self._clock = retries, backoff, clock or default_clock()
        self._authorization: str | None = None  # a Basic or Bearer header value, once the registry asked for one
        self.http = self._transport(registry.timeout_s)
        self.sent_bytes = 0  # blob and manifest bytes this client uploaded

    def _transport(self, read_timeout: float | None) -> httpx.Client:
        """A client with no credentials: `_send` adds them, to the registry's own requests only."""
        return httpx.Client(base_url=self.url, headers={"User-Agent": f"so8t-deploy/{__version__}"},
                            timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S), follow_redirects=False,
                            verify=tls_context())

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never the credentials
        return f"RegistryClient({self.url!r})"

    def _error(self, what: str, message: str) -> RegistryError:
        return RegistryError(f"registry {self.url}: {what}: {message}")

    # -- requests, authentication and retries ---------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delay = self._backoff
        for attempt in range(1, self._retries + 1):
            try:
                try:
                    return fn()
                except httpx.TransportError as e:
                    raise _Retry(f"unreachable ({_transport_reason(e)})") from e
            except _Retry as e:
                if attempt == self._retries:
                    raise self._error(what, str(e)) from e.__cause__
                self._clock.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _send(self, client: httpx.Client, method: str, url: str, scope: str, *, headers: dict[str, str] | None = None,
              content: bytes | Callable[[], bytes | Iterator[bytes]] | None = None) -> httpx.Response:
        """One request with our credentials; on a 401 the challenge is answered once and the request sent again
        (`content` may be a factory: a generator body cannot be sent twice)."""
        for answered in (False, True):
            sent = dict(headers or {})
            if self._authorization and _same_origin(url, self.url):  # not to an upload URL on another host
                sent["Authorization"] = self._authorization
            response = client.request(method, url, headers=sent, content=content() if callable(content) else content)
            if response.status_code != 401 or answered:
                break
            response.read()
            self._authorization = self._answer(response.headers.get("www-authenticate", ""), scope)
            if self._authorization is None:
                break
        if response.status_code >= 500:
            raise _Retry(f"HTTP {response.status_code}: {_body(response)}")
        return response

    def _answer(self, header: str, scope: str) -> str | None:
        """The Authorization value for a challenge, from the configured credentials; None without any."""
        auth = self.registry.auth
        if auth is None:
            return None
        basic = "Basic " + base64.b64encode(f"{auth.username}:{auth.password.get_secret_value()}".encode()).decode()
        scheme, params = _challenge(header)
        if scheme != "bearer":
            return basic
        realm = params.get("realm")
        if not realm:
            raise self._error("authenticate", "a Bearer challenge without a realm")
        if urlsplit(realm).scheme != "https" and not self.registry.insecure:
            raise self._error("authenticate", f"its token realm is not https ({urlsplit(realm).netloc}): the "
                              "credentials are not sent over plain http")
        query = {"service": params.get("service", ""), "scope": scope}
        with httpx.Client(timeout=httpx.Timeout(self.registry.timeout_s, connect=CONNECT_TIMEOUT_S),
                          follow_redirects=False, verify=tls_context()) as client:
            response = client.get(realm, params=query, headers={"Authorization": basic})
        if response.status_code != 200:
            raise self._error("authenticate", f"the token service answered HTTP {response.status_code} "
                              "(check distribution.registry.auth)")
        try:
            answer = response.json()
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise self._error("authenticate", "the token service answered no token")
        return f"Bearer {token}"

    def _refused(self, what: str, response: httpx.Response) -> RegistryError:
        if response.status_code in (401, 403):
            hint = ("set distribution.registry.auth" if self.registry.auth is None else
                    "check distribution.registry.auth and its push rights")
            return self._error(what, f"HTTP {response.status_code}, not allowed ({hint})")
        return self._error(what, f"HTTP {response.status_code}: {_body(response)}")

    # -- reading --------------------------------------------------------------------------------------------

    def manifest_digest(self, repository: str, tag: str) -> str | None:
        """The digest of the manifest under `tag`, None when there is none."""
        scope = f"repository:{repository}:pull"

        def call() -> str | None:
            response = self._send(self.http, "HEAD", f"/v2/{repository}/manifests/{tag}", scope,
                                  headers={"Accept": MANIFEST_MEDIA_TYPE})
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise self._refused(f"read {repository}:{tag}", response)
            digest: str | None = response.headers.get("docker-content-digest")
            return digest

        return self._call(f"read {repository}:{tag}", call)

    def has_blob(self, repository: str, digest: str) -> bool:
        scope = f"repository:{repository}:pull"

        def call() -> bool:
            response = self._send(self.http, "HEAD", f"/v2/{repository}/blobs/{digest}", scope)
            if response.status_code == 404:
                return False
            if response.status_code not in (200, 307):
                raise self._refused(f"check blob {digest[:19]}", response)
            return True

        return self._call(f"check blob {digest[:19]}", call)

    # -- pushing --------------------------------------------------------------------------------------------

    def push_blob(self, repository: str, digest: str, size: int, source: Path | bytes,
                  progress: Callable[[int], None] | None = None) -> int:
        """Upload one blob unless the registry has it; the bytes sent (0 when it had it)."""
        if self.has_blob(repository, digest):
            return 0
        scope = f"repository:{repository}:pull,push"
        what = f"push blob {digest[:19]}"

        def body() -> Iterator[bytes] | bytes:
            if isinstance(source, bytes):
                return source
            return file_chunks(source, progress)

        def call() -> int:
            start = self._send(self.http, "POST", f"/v2/{repository}/blobs/uploads/", scope)
            if start.status_code != 202 or "location" not in start.headers:
                raise self._refused(what, start)
            location = urljoin(f"{self.url}/v2/{repository}/blobs/uploads/", start.headers["location"])
            separator = "&" if urlsplit(location).query else "?"
            with self._transport(UPLOAD_BASE_TIMEOUT_S + size / UPLOAD_BYTES_PER_SECOND) as client:
                response = self._send(client, "PUT", f"{location}{separator}digest={digest}", scope, content=body,
                                      headers={"Content-Type": "application/octet-stream",
                                               "Content-Length": str(size)})
            if response.status_code == 400 and "DIGEST_INVALID" in response.text:
                raise self._error(what, "the registry computed another digest (the file changed, or was corrupted "
                                  "on the way)")
            if response.status_code != 201:
                raise self._refused(what, response)
            self.sent_bytes += size
            return size

        return self._call(what, call)

    def put_manifest(self, repository: str, tag: str, data: bytes) -> str:
        """Store a manifest under `tag`; its digest, which the registry must agree with."""
        scope = f"repository:{repository}:pull,push"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        what = f"push manifest {repository}:{tag}"

        def call() -> str:
            response = self._send(self.http, "PUT", f"/v2/{repository}/manifests/{tag}", scope, content=data,
                                  headers={"Content-Type": MANIFEST_MEDIA_TYPE})
            if response.status_code != 201:
                raise self._refused(what, response)
            answered = response.headers.get("docker-content-digest")
            if answered not in (None, digest):
                raise self._error(what, f"the registry stored it as {answered}, not {digest}")
            self.sent_bytes += len(data)
            return digest

        return self._call(what, call)

    # -- what Ollama's puller needs -------------------------------------------------------------------------

    def check_blob_answer(self, repository: str, digest: str) -> None:
        """RegistryError unless the blob answers as Ollama's puller requires (download.go): fetched without
        credentials (an anonymous token from the registry's realm if it asks for one, as auth.go does),
        following redirects while they stay on the registry's host, then 200 or 307 with a Location header."""
        what = f"anonymous GET of blob {digest[:19]}"

        def call() -> None:
            url = f"{self.url}/v2/{repository}/blobs/{digest}"
            headers: dict[str, str] = {}
            with self._transport(self.registry.timeout_s) as client:
                for _ in range(MAX_SAME_HOST_REDIRECTS + 1):
                    with client.stream("GET", url, headers=headers) as response:
                        if response.status_code >= 500:
                            raise _Retry(f"HTTP {response.status_code}")
                        if response.status_code == 401 and not headers:
                            token = self._anonymous_token(client, response.headers.get("www-authenticate", ""))
                            if token is not None:
                                headers = {"Authorization": f"Bearer {token}"}
                                continue
                        location = response.headers.get("location")
                        if response.is_redirect and location and \
                                urlsplit(urljoin(url, location)).hostname == urlsplit(url).hostname:
                            url = urljoin(url, location)  # Ollama follows a redirect that stays on the host
                            continue
                        problem = location_problem(response)
                        break
                else:
                    problem = f"more than {MAX_SAME_HOST_REDIRECTS} redirects"
            if problem:
                raise self._error(what, problem + (_LOCATION_FIX if "Location" in problem else ""))

        self._call(what, call)

    def _anonymous_token(self, client: httpx.Client, header: str, scope: str | None = None) -> str | None:
        """The token Ollama would get for a Bearer challenge (server/auth.go): from a realm on the registry's own
        host, the JSON `token` of its answer; None when there is none to get."""
        scheme, params = _challenge(header)
        realm = params.get("realm", "")
        if scheme != "bearer" or not realm or urlsplit(realm).netloc != urlsplit(self.url).netloc:
            return None
        answer = client.get(realm, params={"service": params.get("service", ""),
                                           "scope": scope or params.get("scope", "")})
        try:
            token = answer.json().get("token") if answer.status_code == 200 else None
        except (ValueError, AttributeError):
            token = None
        return token if isinstance(token, str) and token else None

    def probe(self, repository: str, known_blob: str | None = None) -> RegistryProbe:
        """Can hosts pull from here? Reachable, anonymous reads, and blob answers with a Location header (checked on
        `known_blob` when the registry holds one of ours, else on /v2/'s answer headers, else left unknown)."""
        try:
            with self._transport(self.registry.timeout_s) as client:
                response, (anonymous, problem) = self._call("probe", lambda: self._anonymous_reads(client,
                                                                                                   repository))
        except RegistryError as e:
            return RegistryProbe(url=self.url, repository=repository, reachable=False, problem=str(e))
        probe = RegistryProbe(url=self.url, repository=repository, reachable=True, anonymous_reads=anonymous,
                              problem=problem)
        if problem is not None:
            return probe
        if known_blob is not None:
            try:
                self.check_blob_answer(repository, known_blob)
            except RegistryError as e:
                return probe.model_copy(update={"location_header": False, "problem": str(e)})
            return probe.model_copy(update={"location_header": True})
        if "location" in response.headers:
            return probe.model_copy(update={"location_header": True, "note": "no image published yet: its "
                                            "answers carry a Location header"})
        return probe.model_copy(update={"note": "blob answers not checked yet (no image published): apply checks "
                                        "them before any host pulls"})

    def _anonymous_reads(self, client: httpx.Client,
                         repository: str) -> tuple[httpx.Response, tuple[bool, str | None]]:
        """An anonymous GET /v2/, and (anonymous reads work, else the problem) from it."""
        response = client.get("/v2/")
        if response.status_code >= 500:
            raise _Retry(f"HTTP {response.status_code}")
        if response.status_code == 200:
            return response, (True, None)
        where = f"registry {self.url}"
        if response.status_code != 401:
            return response, (False, f"{where}: GET /v2/ answered HTTP {response.status_code}: not an OCI "
                              "distribution registry?")
        header = response.headers.get("www-authenticate", "")
        scheme, params = _challenge(header)
        realm = params.get("realm", "")
        if scheme == "bearer" and realm and urlsplit(realm).netloc != urlsplit(self.url).netloc:
            return response, (False, f"{where}: its token realm is on another host ({urlsplit(realm).netloc}), "
                              "which Ollama's puller refuses (server/auth.go)")
        if self._anonymous_token(client, header, f"repository:{repository}:pull") is not None:
            return response, (True, None)
        return response, (False, f"{where} refuses anonymous reads (HTTP 401, {scheme or 'no'} authentication): "
                          f"Ollama hosts pull without credentials; allow anonymous pulls of {repository}")


_LOCATION_FIX = ("; Ollama's puller needs a Location header on blob answers (ollama#7244): for CNCF distribution "
                 "add `http: {headers: {Location: [\"?\"]}}` to its config")


def location_problem(response: httpx.Response) -> str | None:
    """Why Ollama's puller would fail on this blob answer (download.go: 200 or 307, with a Location), or None."""
    if response.status_code in (401, 403):
        return f"HTTP {response.status_code}: Ollama hosts pull without credentials"
    if response.status_code not in (200, 307):
        return f"HTTP {response.status_code}: Ollama's puller accepts only 200 or 307, with a Location header"
    if "location" not in response.headers:
        return "the answer has no Location header, so Ollama's pull fails ('http: no Location header in response')"
    return None


def _same_origin(url: str, base: str) -> bool:
    """Whether `url` (absolute, or relative to `base`) goes to `base`'s scheme, host and port."""
    target, origin = urlsplit(urljoin(base + "/", url)), urlsplit(base)
    return (target.scheme, target.netloc) == (origin.scheme, origin.netloc)


def _body(response: httpx.Response) -> str:
    try:
        response.read()
        return _short(response.text)
    except httpx.HTTPError:
        return "no message"


__all__ = ["MANIFEST_MEDIA_TYPE", "RegistryClient", "RegistryProbe", "location_problem"]
