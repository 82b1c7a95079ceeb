"""POST /api/create as Ollama runs it (server/create.go, server/quantization.go): a worker that hands
every progress line to the request handler over an unbuffered channel."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.gotemplate import TemplateError
from tests.gotemplate.gofmt import go_json

from .common import CHUNK, REPO, ApiError, log
from .faults import CreateFaults
from .ggufinfo import GGUFError, GGUFInfo, human_number, read_gguf
from .names import ModelName
from .store import CONFIG_MEDIA, MEDIA, MODEL_MEDIA, Layer
from .templates import autodetected_layers

if TYPE_CHECKING:
    from .api import App

PROGRESS_DIGEST = "0000000000000000000"  # what Ollama puts in the digest of its quantize progress lines
# Server-side quantize targets (fs/ggml ParseFileType) and the types it quantizes from.
QUANTIZE_TARGETS = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q4_K": 15, "BF16": 32}
FLOAT_SOURCES = ("F16", "BF16", "F32")


# --- llama-quantize (server/quantization.go) ------------------------------------------------------------

# Runs in a child process, as Ollama shells out to llama-quantize: llama.cpp's log (with its "[  3/ 15]"
# progress) goes to stdout, and a GGUF that llama.cpp cannot load fails the child, not the server.
_QUANTIZE_CHILD = """
import ctypes, sys
import llama_cpp

@llama_cpp.llama_log_callback
def _log(level, text, user_data):
    sys.stdout.write(text.decode("utf-8", "replace"))
    sys.stdout.flush()

llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
params = llama_cpp.llama_model_quantize_default_params()
params.nthread = 2
if sys.argv[3] == "COPY":
    params.only_copy = True  # llama.cpp then keeps the source's file type
else:
    params.ftype = int(sys.argv[3])
sys.exit(1 if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)) else 0)
"""
_PROGRESS_RE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def exit_status(code: int) -> str:
    """How Go's os/exec describes a child's end."""
    if code >= 0:
        return f"exit status {code}"
    names = {signal.SIGABRT: "aborted", signal.SIGSEGV: "segmentation fault", signal.SIGKILL: "killed"}
    return f"signal: {names.get(-code, signal.Signals(-code).name.lower())}"


def run_llama_quantize(source: Path, target: Path, type_arg: str, tensor_bytes: int, progress) -> None:
    """Quantize (or COPY) source into target; `progress(n)` gets the tensor bytes done so far, as Ollama derives
    them from llama-quantize's "[ i/ n]" lines."""
    proc = subprocess.Popen([sys.executable, "-c", _QUANTIZE_CHILD, str(source), str(target), type_arg],
                            stdout=subprocess.PIPE, cwd=REPO)
    try:
        last = 0
        for line in proc.stdout:
            if match := _PROGRESS_RE.search(line.decode("utf-8", "replace")):
                current, total = int(match.group(1)), int(match.group(2))
                done = tensor_bytes * current // total if total else 0
                if done > last:
                    last = done
                    progress(done)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # the create was abandoned while the child ran
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if code != 0:
        raise ApiError(500, f"llama-quantize failed: {exit_status(code)}")


# --- create (server/create.go) --------------------------------------------------------------------------

class Abandoned(Exception):
    """The handler stopped reading this create's lines: the worker must never go on."""


class Rendezvous:
    """Go's unbuffered channel between the create worker and the request handler: send() returns only once
    receive() has taken the value. When the handler abandons the channel, a pending or later send() raises
    Abandoned (in Ollama the goroutine blocks there forever: nothing after it ever happens)."""

    _EMPTY = object()

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._slot: object = self._EMPTY
        self._closed = self._abandoned = False

    def send(self, value: dict) -> None:
        with self._cond:
            if self._abandoned:
                raise Abandoned
            self._slot = value
            self._cond.notify_all()
            while self._slot is not self._EMPTY and not self._abandoned:
                self._cond.wait()
            if self._slot is not self._EMPTY:
                raise Abandoned

    def receive(self) -> dict | None:
        """The next value, or None once the worker is done (the channel is closed)."""
        with self._cond:
            while self._slot is self._EMPTY and not self._closed:
                self._cond.wait()
            if self._slot is self._EMPTY:
                return None
            value, self._slot = self._slot, self._EMPTY
            self._cond.notify_all()
            return value

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abandon(self) -> None:
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()

    @property
    def abandoned(self) -> bool:
        return self._abandoned


@dataclass
class CreateJob:
    """A create running in its worker; the handler streams (or, with "stream": false, waits for) its lines.
    pull.PullJob is one too."""

    name: ModelName
    stream: bool
    channel: Rendezvous = field(default_factory=Rendezvous)
    kind: str = "create"
    finished: threading.Event = field(default_factory=threading.Event)  # set once the worker is done


@dataclass
class ModelLayer:
    """A layer on its way into a manifest, with the GGUF it holds (for model layers)."""

    layer: Layer
    info: GGUFInfo | None = None
    rewrite: bool = False  # an uploaded GGUF, which Ollama rewrites


def _json_list_of_strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(500, "json: cannot unmarshal license into Go value of type []string")
    return value


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def gguf_info(path: Path) -> GGUFInfo:
    try:
        return read_gguf(path)
    except GGUFError as exc:
        raise ApiError(500, str(exc)) from None


def message_json(message: dict) -> dict:
    """An api.Message as Go encodes it (struct order, empty optional fields left out)."""
    out = {"role": message.get("role", ""), "content": message.get("content", "")}
    for key in ("thinking", "images", "tool_calls", "tool_name", "tool_call_id"):
        if message.get(key):
            out[key] = message[key]
    return out


class Creation:
    """One /api/create in its worker thread: CreateHandler's goroutine and createModel, step by step. Every
    line goes through `send`, which blocks until the handler took it (see Rendezvous)."""

    def __init__(self, app: App, job: CreateJob, req: dict, faults: CreateFaults):
        self.app, self.store, self.job, self.req, self.faults = app, app.store, job, req, faults
        self.send = job.channel.send
        self.config: dict = {"model_format": "", "model_family": "", "model_families": None, "model_type": "",
                             "file_type": "", "renderer": req.get("renderer") or "",
                             "parser": req.get("parser") or "", "requires": req.get("requires") or ""}
        self.injected = self.silenced = False

    def run(self) -> None:
        old = self.store.read(self.job.name)
        if self.req.get("from"):
            base = self.base_layers()
        elif self.req.get("files") is not None:
            base = self.file_layers()
        else:
            raise ApiError(400, "neither 'from' or 'files' was specified")
        base = [self.model_layer(ml) for ml in base]
        self.fail_on_purpose()  # for creates that rewrote nothing
        self.keep_silent()
        layers = self.metadata_layers([ml.layer for ml in base])
        config = self.store.bytes_layer((go_json(self.config_json(), sort_keys=False) + "\n").encode(), CONFIG_MEDIA)
        for layer in layers:
            if layer.status:
                self.send({"status": layer.status})
        self.send({"status": "writing manifest"})
        with self.store.lock:
            self.store.write(self.job.name, config, layers)
            if old is not None and not os.environ.get("OLLAMA_NOPRUNE"):
                self.store.remove_layers(old)
        self.app.count("creates")

    # -- where the model layers come from --

    def base_layers(self) -> list[ModelLayer]:
        src = ModelName.parse(self.req["from"])
        if src is None:
            raise ApiError(400, "invalid model name")
        src = self.store.existing_name(src)
        m = self.store.read(src)
        if m is None:  # Ollama pulls it from the registry; the test server is offline
            self.send({"status": "pulling manifest"})
            raise ApiError(500, f'pull model manifest: Get "https://{src.host}/v2/{src.namespace}/{src.model}'
                                f'/manifests/{src.tag}": dial tcp: lookup {src.host}: no such host')
        with contextlib.suppress(OSError, ValueError, ApiError):
            base = json.loads(self.store.blob_path(m.config.digest).read_bytes())
            for key in ("renderer", "parser", "requires", "model_format", "capabilities"):
                self.config[key] = self.config.get(key) or base.get(key)
        out = []
        for layer in m.layers:
            new = self.store.existing_layer(layer.digest, layer.media_type, src.display())
            is_gguf = layer.media_type in (MODEL_MEDIA, MEDIA + "projector", MEDIA + "adapter")
            out.append(ModelLayer(new, gguf_info(self.store.blob_path(new.digest)) if is_gguf else None))
        return out

    def file_layers(self) -> list[ModelLayer]:
        files = self.req["files"]
        kind = self.detect_type(files)
        if kind == "safetensors":
            raise ApiError(400, "the test server imports GGUF files only")
        if kind != "gguf":
            raise ApiError(400, "unknown type")
        if len(files) != 1:
            raise ApiError(400, "the test server imports one GGUF file per create")
        [(source, digest)] = files.items()
        self.send({"status": "parsing GGUF"})
        try:
            path = self.store.blob_path(digest)
            with path.open("rb") as f:
                head = f.read(512)
        except ApiError as exc:
            raise ApiError(500, str(exc)) from None
        except FileNotFoundError:
            raise ApiError(500, f"open {path}: no such file or directory") from None
        if not head.startswith(b"GGUF"):
            raise ApiError(400, "supplied file was not in GGUF format")
        info = gguf_info(path)
        media = {"adapter": MEDIA + "adapter", "projector": MEDIA + "projector", "mmproj": MEDIA + "projector"}
        layer = self.store.existing_layer(digest, media.get(info.kv.get("general.type"), MODEL_MEDIA), source)
        detected = autodetected_layers(self.store, info.kv)  # detectChatTemplate: a named template and its stops
        return [ModelLayer(layer, info, rewrite=True), *(ModelLayer(t) for t in detected)]

    def detect_type(self, files: dict) -> str:
        """detectModelTypeFromFiles: by suffix, else a blob that starts like a GGUF."""
        for key, digest in files.items():
            if key.endswith(".safetensors"):
                return "safetensors"
            if key.endswith(".gguf"):
                return "gguf"
            try:
                with self.store.blob_path(digest).open("rb") as f:
                    if f.read(4) == b"GGUF":
                        return "gguf"
            except (ApiError, OSError):
                return ""
        return ""

    # -- the model layer: quantize, or the COPY rewrite --

    def model_layer(self, ml: ModelLayer) -> ModelLayer:
        if ml.info is None or ml.layer.media_type != MODEL_MEDIA:
            return ml
        rewrote = False
        quant = str(self.req.get("quantize") or self.req.get("quantization") or "").upper()
        if quant:
            if quant not in QUANTIZE_TARGETS:
                raise ApiError(500, f"unsupported quantization type {quant} - supported types are "
                                    "F32, F16, Q4_K_S, Q4_K_M, Q8_0")
            if ml.info.file_type not in FLOAT_SOURCES:
                raise ApiError(500, "quantization is only supported for F16, BF16 and F32 models")
            if ml.info.kv.get("general.file_type") != QUANTIZE_TARGETS[quant]:
                ml, rewrote = self.rewrite(ml, quant), True
        if not rewrote and ml.rewrite and not ml.info.has_compatibility_tensors():
            ml = self.rewrite(ml, "COPY")
        info, c = ml.info, self.config
        c["model_format"] = c["model_format"] or "gguf"
        c["model_family"] = c["model_family"] or info.architecture
        c["model_type"] = c["model_type"] or human_number(info.parameter_count)
        c["file_type"] = c["file_type"] or info.file_type
        c["model_families"] = [*(c["model_families"] or []), info.architecture]
        return ml

    def rewrite(self, ml: ModelLayer, type_name: str) -> ModelLayer:
        """rewriteLayerWithLlamaQuantize: llama.cpp's quantizer into a temp file, with progress lines, then
        `verifying conversion` and a new layer copied and hashed from it (no line meanwhile)."""
        layer, info = ml.layer, ml.info
        total = max(layer.size - info.data_offset, 1)
        status = ("validating GGUF model" if type_name == "COPY"
                  else f"quantizing {info.file_type} model to {type_name}")

        def progress(done: int) -> None:
            self.send({"status": status, "digest": PROGRESS_DIGEST, "total": layer.size,
                       "completed": int(done / total * layer.size)})

        out = self.store.new_temp(type_name)
        try:
            type_arg = "COPY" if type_name == "COPY" else str(QUANTIZE_TARGETS[type_name])
            try:
                run_llama_quantize(self.store.blob_path(layer.digest), out, type_arg,
                                   sum(t["nbytes"] for t in info.tensors), progress)
            except ApiError as exc:
                if type_name == "COPY":
                    raise ApiError(500, "failed to validate GGUF with llama-quantize without compatibility "
                                        f"patches: {exc}") from None
                raise
            self.fail_on_purpose()
            self.send({"status": "verifying conversion"})
            self.keep_silent()
            new = self.store.new_layer(file_chunks(out), layer.media_type)
        finally:
            out.unlink(missing_ok=True)
        return ModelLayer(new, gguf_info(self.store.blob_path(new.digest)))

    def fail_on_purpose(self) -> None:
        """The fail_stream rule: an error where llama-quantize's validation would fail."""
        if self.faults.fail_stream and not self.injected:
            self.injected = True
            log(f"fault: failing the create of {self.job.name.display()} in-stream")
            raise ApiError(500, self.faults.fail_stream["message"])

    def keep_silent(self) -> None:
        """The silence rule: no line for a while, as when Ollama copies and hashes a multi-GB GGUF."""
        if self.faults.silence_s and not self.silenced:
            self.silenced = True
            log(f"fault: {self.faults.silence_s} s of silence in the create of {self.job.name.display()}")
            time.sleep(self.faults.silence_s)

    # -- template, system, license, parameters, messages --

    def metadata_layers(self, layers: list[Layer]) -> list[Layer]:
        req = self.req
        if req.get("template"):
            layers = self.without(layers, MEDIA + "template")
            try:
                self.app.templates.parse(req["template"])
            except TemplateError as exc:
                raise ApiError(400, f"template error: {exc}") from None
            layers.append(self.store.bytes_layer(req["template"].encode(), MEDIA + "template"))
        if req.get("system"):
            layers = self.without(layers, MEDIA + "system")
            layers.append(self.store.bytes_layer(req["system"].encode(), MEDIA + "system"))
        for text in _json_list_of_strings(req.get("license") or []):
            layers.append(self.store.bytes_layer(text.encode(), MEDIA + "license"))
        layers = self.parameters_layer(layers)
        if req.get("messages"):
            layers = self.without(layers, MEDIA + "messages")
            data = go_json([message_json(m) for m in req["messages"]], sort_keys=False) + "\n"
            layers.append(self.store.bytes_layer(data.encode(), MEDIA + "messages"))
        return layers

    def parameters_layer(self, layers: list[Layer]) -> list[Layer]:
        """setParameters: the request's parameters, plus those of a base model that it does not set."""
        params = dict(self.req.get("parameters") or {})
        for layer in layers:
            if layer.media_type == MEDIA + "params":
                for key, value in json.loads(self.store.blob_path(layer.digest).read_bytes()).items():
                    params.setdefault(key, value)
        if not params:
            return layers
        layers = self.without(layers, MEDIA + "params")
        layers.append(self.store.bytes_layer((go_json(params) + "\n").encode(), MEDIA + "params"))
        return layers

    def without(self, layers: list[Layer], media_type: str) -> list[Layer]:
        """removeLayer: drop layers of one kind, deleting their blobs when no manifest uses them."""
        for layer in layers:
            if layer.media_type == media_type:
                self.store.remove_blob_if_unused(layer)
        return [layer for layer in layers if layer.media_type != media_type]

    def config_json(self) -> dict:
        """model.ConfigV2 in field order (empty optional fields left out)."""
        c = self.config
        out = {key: c[key] for key in ("model_format", "model_family", "model_families", "model_type", "file_type")}
        for key in ("renderer", "parser", "requires", "capabilities"):
            if c.get(key):
                out[key] = c[key]
        return {**out, "architecture": "amd64", "os": "linux"}
