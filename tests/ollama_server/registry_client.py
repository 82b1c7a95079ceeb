"""The HTTP client side of Ollama's registry code (server/images.go makeRequest, makeRequestWithRetry,
server/auth.go getAuthorizationToken), over plain sockets so that a pull can be cancelled between any two reads,
can close a response without reading its body (as Go's `defer resp.Body.Close()` does) and sees every byte.

Errors read like Go's: `Get "URL": dial tcp HOST:PORT: connect: connection refused`, `... http: server gave HTTP
response to HTTPS client`, `http: no Location header in response`, and makeRequestWithRetry's `file does not
exist` (404), `STATUS: BODY` (other errors) and `unauthorized: access denied`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from tests.gotemplate.gofmt import quote

REDIRECTS = (301, 302, 303, 307, 308)
POLL_S = 0.1  # how often a blocked read looks at its context


class GoError(Exception):
    """An error with Go's message; `kind` names the sentinel errors the pull code tests with errors.Is."""

    def __init__(self, message: str, kind: str = ""):
        super().__init__(message)
        self.kind = kind


def canceled() -> GoError:
    return GoError("context canceled", "canceled")


class Context:
    """A Go context: cancelled by cancel(), by its deadline, by its parent, or when `gone()` says so."""

    def __init__(self, parent: Context | None = None, timeout_s: float | None = None,
                 gone: Callable[[], bool] | None = None):
        self.parent, self.gone = parent, gone
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def err(self) -> GoError | None:
        if self.parent is not None and (err := self.parent.err()) is not None:
            return err
        if self._cancelled.is_set() or (self.gone is not None and self.gone()):
            return canceled()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return GoError("context deadline exceeded", "deadline")
        return None

    def check(self) -> None:
        if (err := self.err()) is not None:
            raise err


@dataclass
class Response:
    """A response whose body has not been read yet (read it with body()/chunks(), or close() to drop it)."""

    method: str
    url: str
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    sock: socket.socket
    buffered: bytes
    ctx: Context
    _closed: bool = field(default=False, repr=False)

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def location(self) -> str:
        """Response.Location: the Location header resolved against the request URL."""
        value = self.header("location")
        if not value:
            raise GoError("http: no Location header in response")
        return urljoin(self.url, value)

    def chunks(self, stall_s: float | None = None) -> Iterator[bytes]:
        """The body as it arrives. A body that ends before its Content-Length (or chunked end) raises
        `unexpected EOF`; no byte for stall_s seconds raises a `stalled` GoError; a cancelled context `context
        canceled`."""
        try:
            if self.method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
                return
            if "chunked" in self.header("transfer-encoding").lower():
                yield from self._chunked(stall_s)
            elif self.header("content-length"):
                yield from self._sized(int(self.header("content-length")), stall_s)
            else:  # until the server closes
                if self.buffered:
                    yield self._take(len(self.buffered), stall_s)
                while data := self._recv(stall_s, eof_ok=True):
                    yield data
        finally:
            self.close()

    def body(self) -> bytes:
        return b"".join(self.chunks())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self.sock.close()

    # -- reading --

    def _recv(self, stall_s: float | None, eof_ok: bool = False) -> bytes:
        last = time.monotonic()
        while True:
            self.ctx.check()
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if pending or select.select([self.sock], [], [], POLL_S)[0]:
                try:
                    data = self.sock.recv(1 << 16)
                except ssl.SSLWantReadError:
                    continue
                except OSError as exc:
                    raise GoError("unexpected EOF" if not eof_ok else str(exc), "unexpected-eof") from None
                if not data and not eof_ok:
                    raise GoError("unexpected EOF", "unexpected-eof")
                return data
            if stall_s is not None and time.monotonic() - last > stall_s:
                raise GoError("part stalled", "stalled")

    def _take(self, n: int, stall_s: float | None) -> bytes:
        """Up to n bytes: what is buffered first, else one read from the socket."""
        if not self.buffered:
            self.buffered = self._recv(stall_s)
        data, self.buffered = self.buffered[:n], self.buffered[n:]
        return data

    def _sized(self, length: int, stall_s: float | None) -> Iterator[bytes]:
        while length > 0:
            data = self._take(min(length, 1 << 20), stall_s)
            length -= len(data)
            yield data

    def _line(self, stall_s: float | None) -> bytes:
        while b"\n" not in self.buffered:
            self.buffered += self._recv(stall_s)
        line, _, self.buffered = self.buffered.partition(b"\n")
        return line

    def _chunked(self, stall_s: float | None) -> Iterator[bytes]:
        while True:
            size = int(self._line(stall_s).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self._line(stall_s).strip():  # trailers
                    pass
                return
            yield from self._sized(size, stall_s)
            self._line(stall_s)  # the CRLF after the chunk


def go_method(method: str) -> str:
    """How url.Error names a method: "Get", "Head"."""
    return method[:1] + method[1:].lower()


def _plain_http_answers(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether a TLS ClientHello to host:port is answered by something starting "HTTP/" (Go's check for
    ErrSchemeMismatch, "http: server gave HTTP response to HTTPS client")."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                                        server_hostname=host)
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
            sock.sendall(outgoing.read())
            head = b""
            while len(head) < 5 and (data := sock.recv(5 - len(head))):
                head += data
            return head == b"HTTP/"
    except OSError:
        return False


def _connect(ctx: Context, scheme: str, host: str, port: int, hostname: str) -> socket.socket:
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except ConnectionRefusedError:
        raise GoError(f"dial tcp {address}: connect: connection refused") from None
    except socket.gaierror:
        raise GoError(f"dial tcp: lookup {hostname}: no such host") from None
    except TimeoutError:
        raise GoError(f"dial tcp {address}: i/o timeout") from None
    except OSError as exc:
        raise GoError(f"dial tcp {address}: {exc.strerror or exc}") from None
    if scheme != "https":
        return sock
    try:
        tls = ssl.create_default_context().wrap_socket(sock, server_hostname=hostname)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise GoError(f"tls: failed to verify certificate: x509: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        sock.close()
        if _plain_http_answers(host, port):
            raise GoError("http: server gave HTTP response to HTTPS client") from None
        raise GoError(f"tls: {exc.reason or exc}".lower()) from None
    except OSError as exc:
        sock.close()
        raise GoError(str(exc)) from None
    ctx.check()
    return tls


def send(ctx: Context, method: str, url: str, headers: dict[str, str]) -> Response:
    """One request, no redirects. Errors are bare (the caller adds url.Error's `Method "URL": `)."""
    ctx.check()
    parts = urlsplit(url)
    scheme, hostname = parts.scheme, parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    sock = _connect(ctx, scheme, hostname, port, hostname)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}",
             *(f"{k}: {v}" for k, v in headers.items()), "Accept-Encoding: identity"]
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        response = Response(method, url, 0, {}, sock, b"", ctx)
        head = b""
        while b"\r\n\r\n" not in head:
            data = response._recv(None, eof_ok=True)
            if not data:
                raise GoError("EOF")
            head += data
    except OSError as exc:
        sock.close()
        raise GoError(str(exc)) from None
    except GoError:
        sock.close()
        raise
    head, _, response.buffered = head.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    try:
        response.status = int(status_line.split()[1])
    except (IndexError, ValueError):
        sock.close()
        raise GoError(f"malformed HTTP response {quote(status_line)}") from None
    for line in header_lines:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        response.headers[key] = f"{response.headers[key]}, {value.strip()}" if key in response.headers \
            else value.strip()
    return response


def do(ctx: Context, method: str, url: str, headers: dict[str, str] | None = None,
       check_redirect: Callable[[str, int], bool] | None = None) -> Response:
    """http.Client.Do: follows up to 10 redirects (301, 302, 303 turn a non-GET/HEAD into a GET), unless
    check_redirect(next_url, hops) answers False (http.ErrUseLastResponse: the redirect itself is returned).
    An Authorization header is not sent to another host. Errors are url.Errors: `Get "URL": ...`."""
    headers = dict(headers or {})
    first_host = urlsplit(url).hostname
    hops = 0
    while True:
        try:
            response = send(ctx, method, url, headers)
        except GoError as exc:
            if exc.kind in ("canceled", "deadline"):
                raise GoError(f'{go_method(method)} "{url}": {exc}', exc.kind) from None
            raise GoError(f'{go_method(method)} "{url}": {exc}') from None
        if response.status not in REDIRECTS or not response.header("location"):
            return response
        target = urljoin(url, response.header("location"))
        if check_redirect is not None and not check_redirect(target, hops):
            return response
        response.close()
        hops += 1
        if hops >= 10:
            raise GoError(f'{go_method(method)} "{target}": stopped after 10 redirects')
        if response.status in (301, 302, 303) and method not in ("GET", "HEAD"):
            method = "GET"
        if urlsplit(target).hostname != first_host:
            headers.pop("Authorization", None)
        url = target


@dataclass
class RegistryOptions:
    """registryOptions: PullHandler sets only Insecure (never a username or password)."""

    insecure: bool = False
    token: str = ""
    user_agent: str = "ollama/0.0.0 (amd64 linux) Go/go1.24.1"
    check_redirect: Callable[[str, int], bool] | None = None


def make_request(ctx: Context, method: str, url: str, headers: dict[str, str] | None,
                 opts: RegistryOptions | None) -> tuple[Response, str]:
    """makeRequest: http when insecure; a Bearer token once one was obtained; Ollama's User-Agent. Returns the
    response and the URL as requested (Go rewrites the scheme of the caller's URL in place)."""
    parts = urlsplit(url)
    if opts is not None and opts.insecure and parts.scheme != "http":
        url = urlunsplit(("http", *parts[1:]))
    headers = dict(headers or {})
    if opts is not None and opts.token:
        headers["Authorization"] = "Bearer " + opts.token
    headers["User-Agent"] = opts.user_agent if opts is not None else RegistryOptions().user_agent
    return do(ctx, method, url, headers, opts.check_redirect if opts is not None else None), url


def make_request_with_retry(ctx: Context, method: str, url: str, headers: dict[str, str] | None,
                            opts: RegistryOptions) -> tuple[Response, str]:
    """makeRequestWithRetry: a 401 fetches a token (one retry); 404 is `file does not exist`; any other status
    from 400 up is `STATUS: BODY`."""
    for _ in range(2):
        response, url = make_request(ctx, method, url, headers, opts)
        if response.status == 401:
            response.close()
            opts.token = authorization_token(ctx, response.header("www-authenticate"), urlsplit(url).netloc)
        elif response.status == 404:
            response.close()
            raise GoError("file does not exist", "not-exist")
        elif response.status >= 400:
            try:
                body = response.body()
            except GoError as exc:
                raise GoError(f"{response.status}: {exc}") from None
            raise GoError(f"{response.status}: {body.decode('utf-8', 'replace')}")
        else:
            return response, url
    raise GoError("unauthorized: access denied")


def _challenge_value(header: str, key: str) -> str:
    """getValue: the text after `key="` up to a quote followed by a comma (or the end)."""
    start = header.find(key + "=")
    if start < 0:
        return ""
    start += len(key) + 2
    end = start
    while end < len(header):
        if header[end] == '"' and (end + 1 >= len(header) or header[end + 1] == ","):
            break
        end += 1
    return header[start:end]


def authorization_token(ctx: Context, challenge: str, original_host: str) -> str:
    """getAuthorizationToken: Ollama asks the challenge's realm for a token with a request signed by its own
    key (the test server has none and sends an unsigned stand-in). A realm on another host, which a registry
    with basic auth (realm="basic-realm") always is, fails before any request."""
    challenge = challenge.removeprefix("Bearer ")
    realm, service, scope = (_challenge_value(challenge, k) for k in ("realm", "service", "scope"))
    parts = urlsplit(realm)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [("service", service), *(("scope", s) for s in scope.split(" ")),
              ("ts", str(int(time.time()))), ("nonce", base64.b64encode(secrets.token_bytes(16)).decode())]
    query.sort(key=lambda kv: kv[0])  # url.Values.Encode sorts by key
    realm_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    if parts.netloc != original_host:
        raise GoError(f"realm host {quote(parts.netloc)} does not match original host {quote(original_host)}")
    digest = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
    signature = f"ollama-test-server:unsigned,{digest}"
    response, _ = make_request(ctx, "GET", realm_url, {"Authorization": signature}, None)
    try:
        body = response.body()
    except GoError as exc:
        raise GoError(f"{response.status}: {exc}") from None
    if response.status >= 400:
        raise GoError(f"{response.status}: {body.decode('utf-8', 'replace')}" if body else str(response.status))
    try:
        token = json.loads(body)
    except ValueError as exc:
        raise GoError(f"invalid character in token response: {exc}") from None
    return str(token.get("token", "")) if isinstance(token, dict) else ""

