"""POST /api/pull as current Ollama runs it (server/routes.go PullHandler, server/images.go PullModel and
pullModelManifest, server/download.go): the Docker v2 manifest, then every blob the store lacks, each downloaded
in ranged parts into a resumable `<blob>-partial`, then the digests checked and the manifest written as fetched.

Lines: `pulling manifest`; per blob `pulling <12 hex>` {digest, total, completed} (a blob already stored: one
line, completed = total; a download: one line per 60 ms tick while it runs, so none for a download that takes
less); `verifying sha256 digest`; `writing manifest`; `removing unused layers` (only when the replaced manifest
had layers no longer used); `success`. Total, completed and digest are left out when empty, as Go's omitempty.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .common import CHUNK, ApiError, log
from .create import Abandoned, CreateJob
from .names import ModelName
from .registry_client import Context, GoError, RegistryOptions, do, make_request_with_retry
from .store import MANIFEST_MEDIA, MEDIA, Layer

if TYPE_CHECKING:
    from .api import App

NUM_PARTS = 16  # numDownloadParts
MIN_PART = 100 * 1000 * 1000  # minDownloadPartSize (format.MegaByte is 10^6)
MAX_PART = 1000 * 1000 * 1000
MAX_RETRIES = 6
STALL_S = 30.0  # downloadStallTimeout
TICK_S = 0.06  # Wait's progress ticker
DIRECT_URL_TIMEOUT_S = 30.0
TENSOR_MEDIA = MEDIA + "tensor"


@dataclass
class PullJob(CreateJob):
    """A pull in its worker thread. `ctx` is the request's context: cancelled when the client goes away."""

    insecure: bool = False
    kind: str = "pull"
    ctx: Context = field(init=False)

    def __post_init__(self) -> None:
        self.ctx = Context(gone=lambda: self.channel.abandoned)


def progress(status: str, digest: str = "", total: int = 0, completed: int = 0) -> dict:
    """api.ProgressResponse as Go encodes it (omitempty)."""
    out: dict = {"status": status}
    for key, value in (("digest", digest), ("total", total), ("completed", completed)):
        if value:
            out[key] = value
    return out


# --- blob downloads (server/download.go) ------------------------------------------------------------------

@dataclass
class Part:
    n: int
    offset: int
    size: int
    completed: int = 0

    def to_json(self) -> dict:
        return {"N": self.n, "Offset": self.offset, "Size": self.size, "Completed": self.completed}


class BlobDownload:
    """One blob's download, shared by every pull that wants it while it runs (blobDownloadManager). It runs in
    its own thread with its own context, cancelled when the last pull waiting for it stops waiting."""

    def __init__(self, downloads: Downloads, app: App, path: Path, digest: str):
        self.downloads, self.app, self.path, self.digest = downloads, app, path, digest
        self.total = 0
        self.parts: list[Part] = []
        self.done = threading.Event()
        self.err: GoError | None = None
        self.ctx = Context()
        self.cut_after: int | None = None  # the fail_pull_after_bytes fault
        self._lock = threading.Lock()
        self._completed = 0
        self._references = 0

    @property
    def completed(self) -> int:
        with self._lock:
            return self._completed

    def add(self, n: int) -> None:
        with self._lock:
            self._completed += n

    def part_path(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}-partial-{n}")

    def write_part(self, part: Part) -> None:
        self.part_path(part.n).write_text(json.dumps(part.to_json(), separators=(",", ":")) + "\n")

    def prepare(self, ctx: Context, url: str, opts: RegistryOptions) -> str:
        """Prepare: the parts of an earlier attempt, else a HEAD for the size and new parts of 100 MB to 1 GB.
        Returns the blob URL as requested (http when insecure)."""
        for path in sorted(self.path.parent.glob(self.path.name + "-partial-*")):
            try:
                data = json.loads(path.read_text())
                part = Part(int(data["N"]), int(data["Offset"]), int(data["Size"]), int(data["Completed"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise GoError(str(exc)) from None
            self.total += part.size
            self.add(part.completed)
            self.parts.append(part)
        if not self.parts:
            response, url = make_request_with_retry(ctx, "HEAD", url, None, opts)
            response.close()
            try:
                self.total = int(response.header("content-length"))
            except ValueError:
                self.total = 0
            size = min(max(self.total // NUM_PARTS, MIN_PART), MAX_PART)
            offset = 0
            while offset < self.total:
                size = min(size, self.total - offset)
                part = Part(len(self.parts), offset, size)
                self.write_part(part)
                self.parts.append(part)
                offset += size
        if self.parts:
            log(f"downloading {self.digest[7:19]} in {len(self.parts)} {self.parts[0].size} B part(s)")
        return url

    def run(self, url: str, opts: RegistryOptions) -> None:
        try:
            self._run(url, opts)
        except GoError as exc:
            self.err = exc
        except OSError as exc:
            self.err = GoError(str(exc), "enospc" if exc.errno == errno.ENOSPC else "")
        finally:
            self.downloads.forget(self.digest)
            self.done.set()

    def _run(self, url: str, opts: RegistryOptions) -> None:
        partial = self.path.with_name(self.path.name + "-partial")
        with partial.open("r+b" if partial.exists() else "w+b") as file:
            file.truncate(self.total)
            direct = self.direct_url(url, opts)
            inner = Context(self.ctx)
            errors: list[GoError] = []
            threads = [threading.Thread(target=self._part_worker, args=(part, direct, file, inner, errors),
                                        daemon=True, name=f"pull {self.digest[7:19]} part {part.n}")
                       for part in self.parts if part.completed != part.size]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
        for i in range(len(self.parts)):
            self.part_path(i).unlink()
        os.replace(partial, self.path)

    def direct_url(self, url: str, opts: RegistryOptions) -> str:
        """The blob GET that must answer 200 or 307 with a Location (redirects are followed only to the same
        host); retried with backoff for 30 s. The body is not read: the connection is closed."""
        ctx = Context(self.ctx, DIRECT_URL_TIMEOUT_S)
        hostname = urlsplit(url).hostname
        tries = 0
        while True:
            get_opts = RegistryOptions(opts.insecure, opts.token, opts.user_agent,
                                       check_redirect=lambda target, hops: urlsplit(target).hostname == hostname)
            try:
                response, url = make_request_with_retry(ctx, "GET", url, None, get_opts)
            except GoError as exc:
                ctx.check()  # the bare context error, as newBackoff returns it
                log(f"failed to get direct URL; backing off and retrying: {exc}")
                tries += 1
                delay = min(tries * tries * 0.01, 10.0) * (random.random() + 0.5)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:
                    ctx.check()
                    time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                ctx.check()
                continue
            response.close()
            if response.status not in (200, 307):
                raise GoError(f"unexpected status code {response.status}")
            return response.location()

    def _part_worker(self, part: Part, direct: str, file, inner: Context, errors: list[GoError]) -> None:
        try:
            err = self._download_part(part, direct, file, inner)
        except OSError as exc:  # writing the partial or the part file
            err = GoError(str(exc), "enospc" if exc.errno == errno.ENOSPC else "")
        if err is not None:
            with self._lock:
                errors.append(err)
            inner.cancel()  # errgroup: the first error cancels the other parts

    def _download_part(self, part: Part, direct: str, file, inner: Context) -> GoError | None:
        err: GoError | None = None
        tries = 0
        while tries < MAX_RETRIES:
            err = self._download_chunk(part, direct, file, inner)
            if err is None:
                return None
            if err.kind in ("canceled", "enospc", "exhausted"):
                return GoError(str(err)) if err.kind == "exhausted" else err
            if err.kind == "stalled":
                log(f"{self.digest[7:19]} part {part.n} stalled; retrying")
                continue
            sleep = 2 ** tries
            log(f"{self.digest[7:19]} part {part.n} attempt {tries} failed: {err}, retrying in {sleep}s")
            time.sleep(sleep)
            tries += 1
        return GoError(f"max retries exceeded: {err}")

    def _download_chunk(self, part: Part, direct: str, file, inner: Context) -> GoError | None:
        """downloadChunk: a ranged GET of the rest of the part (no auth, redirects followed), copied into the
        partial file; the part file records what arrived (kept on a cut, a stall or a cancel)."""
        ctx = Context(inner)
        start, stop = part.offset + part.completed, part.offset + part.size - 1
        want, n = part.size - part.completed, 0
        with self._lock:  # the fault breaks off the first part that fetches, once
            cut, self.cut_after = self.cut_after, None
        try:
            response = do(ctx, "GET", direct, {"Range": f"bytes={start}-{stop}",
                                                  "User-Agent": "Go-http-client/1.1"})
        except GoError as exc:
            return exc
        err: GoError | None = None
        try:
            for data in response.chunks(stall_s=STALL_S):
                data = data[:want - n]
                if cut is not None and cut < want and n + len(data) >= cut:
                    data = data[:cut - n]
                    err = GoError("max retries exceeded: unexpected EOF", "exhausted")
                self.add(len(data))
                self.app.count("bytes_pulled", len(data))
                os.pwrite(file.fileno(), data, start + n)  # io.NewOffsetWriter: parts write side by side
                n += len(data)
                if err is not None or n >= want:
                    break
            else:
                if n < want:  # the body ended early but whole: io.EOF, and the progress is rolled back
                    self.add(-n)
                    return GoError("EOF")
        except GoError as exc:
            err = exc
            if exc.kind == "stalled":
                log(f"{self.digest[7:19]} part {part.n} stalled")
            elif exc.kind not in ("canceled", "deadline", "unexpected-eof"):
                self.add(-n)
                return exc
        finally:
            response.close()
        if err is not None and err.kind == "exhausted":
            log(f"fault: failing the download of {self.digest} after {n} bytes")
        part.completed += n
        self.write_part(part)
        return err

    def wait(self, ctx: Context, send) -> GoError | None:
        """Wait: a progress line on every 60 ms tick until the download is done or this pull's context ends."""
        self.acquire()
        try:
            next_tick = time.monotonic() + TICK_S
            while True:
                if self.done.wait(max(0.0, next_tick - time.monotonic())):
                    return self.err
                if (err := ctx.err()) is not None:
                    return err
                send(progress(f"pulling {self.digest[7:19]}", self.digest, self.total, self.completed))
                while next_tick <= time.monotonic():  # a ticker drops the ticks nobody took
                    next_tick += TICK_S
        finally:
            self.release()

    def acquire(self) -> None:
        with self._lock:
            self._references += 1

    def release(self) -> None:
        with self._lock:
            self._references -= 1
            last = self._references == 0
        if last:
            self.ctx.cancel()


class Downloads:
    """blobDownloadManager: the downloads in progress, by digest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, BlobDownload] = {}

    def load_or_store(self, digest: str, new) -> tuple[BlobDownload, bool]:
        with self._lock:
            if digest in self._running:
                return self._running[digest], True
            self._running[digest] = download = new()
            return download, False

    def forget(self, digest: str) -> None:
        with self._lock:
            self._running.pop(digest, None)


# --- PullModel (server/images.go) -----------------------------------------------------------------------

class Pulling:
    """One /api/pull in its worker thread; every line goes through `send` (see create.Rendezvous)."""

    def __init__(self, app: App, job: PullJob):
        self.app, self.store, self.job = app, app.store, job
        self.name: ModelName = job.name
        self.ctx = job.ctx
        self.opts = RegistryOptions(insecure=job.insecure,
                                    user_agent=f"ollama/{app.version()} (amd64 linux) Go/go1.24.1")
        self.took_fault = False

    def send(self, line: dict) -> None:
        self.job.channel.send(line)

    def base_url(self) -> str:
        return f"https://{self.name.host}"

    def run(self) -> None:
        store, name = self.store, self.name
        unused: set[str] = set()
        try:
            old = store.read(name)
        except (ValueError, OSError) as exc:
            log(f"pulling model with bad existing manifest {name.display()}: {exc}")
            old = None
        if old is not None:
            unused = {layer.digest for layer in old.layers} | ({old.config.digest} if old.config.digest else set())
        self.send(progress("pulling manifest"))
        try:
            layers, config_digest, data = self.pull_manifest()
        except GoError as exc:
            raise ApiError(500, f"pull model manifest: {exc}") from None
        if any(layer.media_type == TENSOR_MEDIA for layer in layers):
            raise ApiError(500, "this model requires MLX support, but the MLX runtime is not available")
        skip_verify: dict[str, bool] = {}
        for layer in layers:
            hit = self.download_blob(layer.digest)
            skip_verify[layer.digest] = skip_verify.get(layer.digest, True) and hit
            unused.discard(layer.digest)
        self.send(progress("verifying sha256 digest"))
        for layer in layers:
            if not skip_verify[layer.digest]:
                self.verify_blob(layer.digest)
        unused -= {layer.digest for layer in layers} | {config_digest}
        self.send(progress("writing manifest"))
        store.write_raw(name, data)
        if not os.environ.get("OLLAMA_NOPRUNE") and unused:
            self.send(progress("removing unused layers"))
            store.remove_unused(unused)
        self.app.count("pulls")

    def pull_manifest(self) -> tuple[list[Layer], str, bytes]:
        """pullModelManifest: the manifest's bytes as the registry sent them, and its layers then config."""
        name = self.name
        url = f"{self.base_url()}/v2/{name.namespace}/{name.model}/manifests/{name.tag}"
        response, _ = make_request_with_retry(self.ctx, "GET", url, {"Accept": MANIFEST_MEDIA}, self.opts)
        data = response.body()
        try:
            parsed = json.loads(data)
            if not isinstance(parsed, dict):
                raise ValueError("json: cannot unmarshal into Go value of type manifest.Manifest")
            config = Layer.from_json(parsed.get("config") or {})
            layers = [Layer.from_json(layer) for layer in parsed.get("layers") or []]
        except (ValueError, TypeError, AttributeError) as exc:
            raise GoError(str(exc)) from None
        if config.digest:
            layers.append(config)
        return layers, config.digest, data

    def download_blob(self, digest: str) -> bool:
        """downloadBlob: True (a cache hit) when the blob is stored; else join or start its download and wait."""
        name = self.name
        if not digest:
            raise ApiError(500, f"{name.namespace}/{name.model}: digest is empty")
        path = self.store.blob_path(digest)  # "invalid digest format"
        if path.is_file():
            size = path.stat().st_size
            self.send(progress(f"pulling {digest[7:19]}", digest, size, size))
            return True
        download, running = self.app.downloads.load_or_store(
            digest, lambda: BlobDownload(self.app.downloads, self.app, path, digest))
        if not running:
            if not self.took_fault:
                self.took_fault = True
                download.cut_after = self.app.take_pull_cut(self.name)
            url = f"{self.base_url()}/v2/{name.namespace}/{name.model}/blobs/{digest}"
            try:
                url = download.prepare(self.ctx, url, self.opts)
            except GoError as exc:
                self.app.downloads.forget(digest)
                raise ApiError(500, str(exc)) from None
            threading.Thread(target=download.run, args=(url, self.opts), daemon=True,
                             name=f"download {digest[7:19]}").start()
        err = download.wait(self.ctx, self.send)
        if err is not None:
            raise ApiError(500, str(err))
        return False

    def verify_blob(self, digest: str) -> None:
        """verifyBlob: a blob whose bytes do not hash to its name is deleted."""
        path = self.store.blob_path(digest)
        h = hashlib.sha256()
        try:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            raise ApiError(500, f"open {path}: no such file or directory") from None
        got = "sha256:" + h.hexdigest()
        if got != digest:
            with contextlib.suppress(OSError):
                path.unlink()
            raise ApiError(500, f"digest mismatch, file must be downloaded again: want {digest}, got {got}")


def start_pull(app: App, job: PullJob) -> None:
    threading.Thread(target=_pull_worker, args=(app, job), daemon=True, name=f"pull {job.name.display()}").start()


def _pull_worker(app: App, job: PullJob) -> None:
    try:
        Pulling(app, job).run()
        job.channel.send(progress("success"))
    except Abandoned:
        log(f"pull of {job.name.display()}: the client went away; the pull stops here")
        app.count("pulls_failed")
    except Exception as exc:
        if not isinstance(exc, ApiError | GoError):
            log(traceback.format_exc())
        log(f"pull of {job.name.display()} failed: {exc}")
        app.count("pulls_failed")
        with contextlib.suppress(Abandoned):
            job.channel.send({"error": str(exc)})
    finally:
        job.channel.close()
        job.finished.set()

