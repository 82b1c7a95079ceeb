"""An Ollama-compatible HTTP server for tests that really runs the uploaded GGUF with llama.cpp.

Run it as its own process from the repository root:

    python -m tests.ollama_server --port 0 --data DIR [--version 0.32.15] [--host 127.0.0.1]

It prints one line, ``listening on http://HOST:PORT``, once it accepts connections.

Real-Ollama behaviour (server 0.32.x, see docs/ollama-notes.md) that it follows:
- /api/version, blob HEAD/POST (201 new, 200 present without reading the body, 400 "digest mismatch"),
  /api/create from ``files`` digests or ``from`` with the same status lines and validation, /api/tags, /api/show,
  /api/copy, /api/delete (and pruning of the deleted model's layers), /api/ps, /api/generate, /api/chat.
- Errors are ``{"error": ...}``; streaming is NDJSON (the default); an error after a stream has started is an
  NDJSON ``{"error": ...}`` line under HTTP 200; durations are nanoseconds.
- Blobs and manifests live under --data, so a restart keeps the models; unreferenced blobs are pruned at start
  (unless OLLAMA_NOPRUNE is set), and a version below 0.5.5 refuses the files-based create.
- Prompts go through the model's TEMPLATE (a subset of Go text/template, see `render_template`), cut at
  ``{{ .Response }}``; the model's PARAMETERs are the option defaults, request options override them.

Test-only, not Ollama:
- ``POST /_test/faults`` and ``GET /_test/stats`` (see `FAULT_DEFAULTS`), and `OllamaTestServer` / `ServerPool`
  to start servers from tests.
- Only single-GGUF imports; ``quantize`` runs llama.cpp's quantizer but adds no progress lines; a prompt longer
  than num_ctx is an error instead of being truncated; num_predict defaults to 128.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

CHUNK = 1 << 20
NAME_RE = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*(?::\w[\w.-]{0,127})?")
DIGEST_RE = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
FAULT_DEFAULTS: dict = {
    "cut_upload_after_bytes": None,  # next blob upload: read N bytes, then reset the connection
    "cut_upload_times": 1,  # how many uploads in a row cut_upload_after_bytes cuts
    "fail_generate": False,  # generate/chat answer 500 "injected failure"
    "generate_response": None,  # generate/chat answer this text instead of running llama.cpp
    "generate_tokens_per_second": 50.0,  # the speed reported for generate_response
    "create_stream_error": None,  # next create streams its status lines, then this error line (one-shot)
    "version": None,  # overrides --version
}
# Server-side quantize targets of Ollama >= 0.7 (GGML file type names), and the float types it quantizes from.
QUANTIZE_TARGETS = {"Q4_K_S": "MOSTLY_Q4_K_S", "Q4_K_M": "MOSTLY_Q4_K_M", "Q8_0": "MOSTLY_Q8_0",
                    "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32"}
FLOAT_SOURCES = {"F32", "F16", "BF16"}
KNOWN_OPTIONS = {"num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n",
                 "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty", "stop", "num_ctx",
                 "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread"}
MEDIA = "application/vnd.ollama.image."


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def log(message: str) -> None:
    print(f"[ollama-test-server] {message}", file=sys.stderr, flush=True)


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")  # Go writes UTC times with a Z


def parse_name(raw: object) -> str:
    """'name' or 'name:tag' -> 'name:tag' (a bare name means ':latest', like Ollama)."""
    if not isinstance(raw, str) or not NAME_RE.fullmatch(raw):
        raise ApiError(400, "invalid model name")
    return raw if ":" in raw else f"{raw}:latest"


def parse_digest(raw: str) -> str:
    match = DIGEST_RE.fullmatch(raw or "")
    if not match:
        raise ApiError(400, "invalid digest format")
    return f"sha256:{match.group(1).lower()}"


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber, used for details.parameter_size."""
    for unit, size, digits in (("B", 10**9, 1), ("M", 10**6, 2), ("K", 10**3, 0)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{digits}f}{unit}"
    return str(n)


def parse_keep_alive(value: object) -> float | None:
    """Seconds to keep a model loaded (None = forever), from a number of seconds or a Go duration ('5m')."""
    if value is None or value == "":
        return 300.0
    if isinstance(value, int | float) or re.fullmatch(r"-?\d+(\.\d+)?", str(value)):
        seconds = float(value)
    else:
        units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
        parts = re.findall(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", str(value))
        if not parts or "".join(n + u for n, u in parts) != str(value):
            raise ApiError(400, f"invalid duration {value!r}")
        seconds = sum(float(n) * units[u] for n, u in parts)
    return None if seconds < 0 else seconds


# --- Go text/template subset ----------------------------------------------------------------------------

class TemplateError(ValueError):
    pass


class _Cut(Exception):
    """Raised at {{ .Response }} when rendering a generation prompt: Ollama drops the rest of the template."""


_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\S+')


def parse_template(text: str) -> list:
    """Parse into nodes: str | ('expr', tokens) | ('if', [(cond, body)...], else) | ('range', expr, body, else)."""
    pieces: list = []
    pos = 0
    for m in _ACTION.finditer(text):
        before = text[pos:m.start()]
        pieces.append(before.rstrip() if m.group(1) else before)
        action = "" if m.group(2).startswith("/*") else m.group(2)  # a comment renders nothing
        pieces.append(("action", action, bool(m.group(3))))
        pos = m.end()
    pieces.append(text[pos:])
    # Apply right-trim markers to the following text.
    for i, piece in enumerate(pieces[:-1]):
        if isinstance(piece, tuple) and piece[2] and isinstance(pieces[i + 1], str):
            pieces[i + 1] = pieces[i + 1].lstrip()
    nodes, stop = _parse_nodes(iter(pieces))
    if stop is not None:
        raise TemplateError(f"unexpected {{{{ {stop} }}}}")
    return nodes


def _parse_nodes(pieces: Iterator) -> tuple[list, str | None]:
    nodes: list = []
    for piece in pieces:
        if isinstance(piece, str):
            if piece:
                nodes.append(piece)
            continue
        action = piece[1]
        word = action.split(None, 1)[0] if action else ""
        if word in ("end", "else"):
            return nodes, action
        if word == "if":
            nodes.append(_parse_if(action[2:].strip(), pieces))
        elif word == "range":
            expr = action[5:].strip()
            if ":=" in expr:
                raise TemplateError("range with variables is not supported by the test server")
            body, stop = _parse_nodes(pieces)
            otherwise: list = []
            if stop == "else":
                otherwise, stop = _parse_nodes(pieces)
            if stop != "end":
                raise TemplateError("range without end")
            nodes.append(("range", _TOKEN.findall(expr), body, otherwise))
        elif word in ("with", "define", "block", "template") or ":=" in action:
            raise TemplateError(f"{{{{ {word} }}}} is not supported by the test server")
        elif action:
            nodes.append(("expr", _TOKEN.findall(action)))
    return nodes, None


def _parse_if(cond: str, pieces: Iterator) -> tuple:
    branches = []
    while True:
        body, stop = _parse_nodes(pieces)
        branches.append((_TOKEN.findall(cond), body))
        if stop == "end":
            return ("if", branches, [])
        if stop == "else":
            otherwise, stop = _parse_nodes(pieces)
            if stop != "end":
                raise TemplateError("if without end")
            return ("if", branches, otherwise)
        if stop and stop.startswith("else if "):
            cond = stop[len("else if "):]
            continue
        raise TemplateError("if without end")


def _eval(tokens: list[str], dot: object, root: dict) -> object:
    def operand(tok: str) -> object:
        if tok.startswith('"'):
            return json.loads(tok)
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if tok in ("true", "false"):
            return tok == "true"
        if tok in (".", "$"):
            return dot if tok == "." else root
        base, path = (root, tok[2:]) if tok.startswith("$.") else (dot, tok[1:]) if tok.startswith(".") else (None, "")
        if not path:
            raise TemplateError(f"cannot evaluate {tok!r}")
        for part in path.split("."):
            base = base.get(part) if isinstance(base, dict) else None
        return base

    if not tokens:
        raise TemplateError("empty expression")
    fn, args = tokens[0], [operand(t) for t in tokens[1:]]
    functions = {  # Go's truth is Python's: false, 0, "", nil and empty lists are false
        "eq": lambda: any(args[0] == other for other in args[1:]),
        "ne": lambda: args[0] != args[1],
        "not": lambda: not args[0],
        "and": lambda: all(args),
        "or": lambda: any(args),
        "len": lambda: len(args[0] or ()),
    }
    if fn in functions:
        try:
            return functions[fn]()
        except IndexError:
            raise TemplateError(f"{fn}: missing argument") from None
    if len(tokens) != 1:
        raise TemplateError(f"unsupported expression {' '.join(tokens)!r}")
    return operand(fn)


def _render_nodes(nodes: list, dot: object, root: dict, out: list[str], cut: bool) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "expr":
            value = _eval(node[1], dot, root)
            out.append("" if value is None else str(value))
            if cut and node[1] in ([".Response"], ["$.Response"]):
                raise _Cut
        elif node[0] == "if":
            branch = next((body for cond, body in node[1] if _eval(cond, dot, root)), node[2])
            _render_nodes(branch, dot, root, out, cut)
        else:  # range
            items = _eval(node[1], dot, root) or []
            for item in items:
                _render_nodes(node[2], item, root, out, cut)
            if not items:
                _render_nodes(node[3], dot, root, out, cut)


def render_template(template: str, values: dict, *, cut_at_response: bool = False) -> str:
    """Render the Ollama subset of Go text/template: fields, if/else if/else, range, eq/ne/not/and/or/len, trim."""
    out: list[str] = []
    with contextlib.suppress(_Cut):
        _render_nodes(parse_template(template), values, values, out, cut_at_response)
    return "".join(out)


def render_prompt(template: str, messages: list[dict]) -> str:
    """Ollama's chat prompt: a .Messages template gets all messages; any other template is rendered once per turn
    with .System/.Prompt/.Response, and the last turn is cut at {{ .Response }} so generation continues there."""
    if not template:
        template = "{{ .Prompt }}"
    if ".Messages" in template:
        msgs = [{"Role": m.get("role", ""), "Content": m.get("content", "")} for m in messages]
        system = "\n\n".join(m["Content"] for m in msgs if m["Role"] == "system")
        values = {"System": system, "Messages": msgs, "Prompt": "", "Response": ""}
        return render_template(template, values, cut_at_response=True)
    out, turn = [], {"System": "", "Prompt": "", "Response": ""}
    for message in messages:
        role, content = message.get("role"), message.get("content", "")
        if (role == "system" and (turn["Prompt"] or turn["Response"])) or (role == "user" and turn["Response"]):
            out.append(render_template(template, turn))
            turn = {"System": "", "Prompt": "", "Response": ""}
        key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(role)
        if key:
            turn[key] = content
    out.append(render_template(template, turn, cut_at_response=True))
    return "".join(out)


# --- storage ---------------------------------------------------------------------------------------------

class Store:
    """Blobs (blobs/sha256-<hex>) and one JSON manifest per model (manifests/<quoted name>.json)."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs, self.manifests, self.tmp = root / "blobs", root / "manifests", root / "tmp"
        for d in (self.blobs, self.manifests, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def new_temp(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        os.close(fd)
        return Path(name)

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store a small layer; returns its digest and whether it already existed."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.has_blob(digest):
            return digest, True
        tmp = self.new_temp()
        tmp.write_bytes(data)
        os.replace(tmp, self.blob_path(digest))
        return digest, False

    def _manifest_path(self, name: str) -> Path:
        return self.manifests / (quote(name.lower(), safe="") + ".json")

    def get(self, name: str) -> dict | None:
        path = self._manifest_path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, manifest: dict) -> None:
        tmp = self.new_temp()
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self._manifest_path(manifest["name"]))

    def delete(self, name: str) -> bool:
        with self.lock:
            manifest = self.get(name)
            if manifest is None:
                return False
            self._manifest_path(name).unlink()
            self.prune(candidates={layer["digest"] for layer in manifest["layers"]})
            return True

    def all(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.manifests.glob("*.json"))]

    def prune(self, candidates: set[str] | None = None) -> int:
        """Remove blobs no manifest references (all blobs, or only `candidates`); like Ollama's PruneLayers."""
        with self.lock:
            used = {layer["digest"] for m in self.all() for layer in m["layers"]}
            blobs = {p.name.replace("-", ":", 1) for p in self.blobs.iterdir()} if candidates is None else candidates
            removed = [d for d in blobs if d not in used and self.has_blob(d)]
            for digest in removed:
                self.blob_path(digest).unlink()
            return len(removed)


def manifest_digest(layers: list[dict], details: dict) -> str:
    """Stands in for the sha256 of Ollama's manifest file: it covers every layer and the config, not the name."""
    canonical = json.dumps({"layers": layers, "config": details}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(details, model_info) from a GGUF file; raises ApiError for anything else."""
    from gguf import GGUFReader, GGUFValueType, LlamaFileType

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # any parse failure means "not a usable GGUF"
        raise ApiError(400, f"invalid GGUF file: {exc}") from None
    info: dict = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        # Ollama leaves big arrays (the tokenizer's) out unless verbose; we leave out every array.
        info[key] = None if fld.types[0] == GGUFValueType.ARRAY else fld.contents()
    params = sum(int(t.n_elements) for t in reader.tensors)
    info["general.parameter_count"] = params
    arch = info.get("general.architecture") or "unknown"
    try:
        level = LlamaFileType(info.get("general.file_type")).name.split("_", 1)[1]
    except ValueError:
        level = "unknown"
    details = {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
               "parameter_size": human_number(params), "quantization_level": level}
    return details, info


def quantize_blob(store: Store, source: Path, target: str) -> Path:
    """llama.cpp's quantizer into a temp file in the store (the caller names it by its hash)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANTIZE_TARGETS[target]}")
    params.nthread = 2
    out = store.new_temp()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        out.unlink(missing_ok=True)
        raise ApiError(500, f"llama_model_quantize failed with code {rc}")
    return out


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# --- loaded models ---------------------------------------------------------------------------------------

@dataclass
class Loaded:
    name: str
    manifest: dict
    llm: object
    num_ctx: int
    expires_at: float | None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Models:
    """The llama.cpp models in memory. Unloading only drops the reference: a running generation keeps its own."""

    def __init__(self, store: Store):
        self.store, self.loaded, self.lock = store, {}, threading.Lock()

    def expire(self) -> None:
        with self.lock:
            for name, entry in list(self.loaded.items()):
                if entry.expires_at is not None and entry.expires_at < time.time():
                    del self.loaded[name]

    def unload(self, name: str) -> None:
        with self.lock:
            self.loaded.pop(name, None)

    def load(self, name: str, manifest: dict, num_ctx: int, keep_alive: float | None) -> tuple[Loaded, int]:
        """The loaded model (loading or reloading it as needed) and the load time in ns."""
        import llama_cpp

        self.expire()
        start = time.perf_counter_ns()
        with self.lock:
            entry = self.loaded.get(name)
            if entry is None or entry.num_ctx != num_ctx or entry.manifest["digest"] != manifest["digest"]:
                path = self.store.blob_path(manifest["layers"][0]["digest"])
                try:
                    llm = llama_cpp.Llama(str(path), n_ctx=num_ctx, verbose=False, n_threads=2)
                except Exception as exc:  # llama.cpp reports load failures as ValueError/RuntimeError
                    raise ApiError(500, f"llama runner process has terminated: {exc}") from None
                entry = self.loaded[name] = Loaded(name, manifest, llm, num_ctx, None)
            entry.expires_at = None if keep_alive is None else time.time() + keep_alive
        return entry, time.perf_counter_ns() - start

    def ps(self) -> list[dict]:
        self.expire()
        with self.lock:
            entries = list(self.loaded.values())
        return [{"name": e.name, "model": e.name, "size": e.manifest["size"], "digest": e.manifest["digest"],
                 "details": e.manifest["details"], "size_vram": 0, "context_length": e.num_ctx,
                 "expires_at": datetime.fromtimestamp(e.expires_at or 4102444800, UTC).isoformat()}
                for e in entries]


@dataclass
class Sampling:
    num_predict: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int
    stop: list[str]
    num_ctx: int


def sampling_options(model_params: dict, request_options: dict | None, default_seed: int = -1) -> Sampling:
    """Model PARAMETERs are the defaults and request options override them (a request `stop` replaces the list)."""
    opts = dict(model_params)
    for key, value in (request_options or {}).items():
        if value is None:
            continue
        if key in KNOWN_OPTIONS:
            opts[key] = value
        else:
            log(f"invalid option provided: {key}")  # Ollama only logs unknown options
    try:
        stop = opts.get("stop") or []
        return Sampling(
            num_predict=int(opts.get("num_predict", 128)), temperature=float(opts.get("temperature", 0.8)),
            top_k=int(opts.get("top_k", 40)), top_p=float(opts.get("top_p", 0.9)),
            min_p=float(opts.get("min_p", 0.0)), repeat_penalty=float(opts.get("repeat_penalty", 1.1)),
            seed=int(opts.get("seed", default_seed)), stop=[stop] if isinstance(stop, str) else [str(s) for s in stop],
            num_ctx=min(int(opts.get("num_ctx") or 2048), 4096))
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"invalid options: {exc}") from None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still be the start of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def generate_pieces(loaded: Loaded, prompt: str, opts: Sampling, stats: dict) -> Iterator[str]:
    """Run llama.cpp; yield text pieces and fill `stats` with counts, durations (ns) and done_reason."""
    import llama_cpp

    llm = loaded.llm
    with loaded.lock:
        start = time.perf_counter_ns()
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        limit = opts.num_ctx - len(tokens)
        if limit <= 0:
            raise ApiError(400, f"prompt is {len(tokens)} tokens, more than num_ctx {opts.num_ctx}")
        limit = min(opts.num_predict, limit) if opts.num_predict >= 0 else limit
        llm.set_seed(opts.seed if opts.seed >= 0 else random.getrandbits(31))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending, count, first_at, reason = "", 0, None, "length"
        stats.update(prompt_eval_count=len(tokens), context=list(tokens))
        generator = llm.generate(tokens, top_k=opts.top_k, top_p=opts.top_p, min_p=opts.min_p,
                                 temp=opts.temperature, repeat_penalty=opts.repeat_penalty)
        for token in generator if limit else ():
            first_at = first_at or time.perf_counter_ns()
            count += 1  # like Ollama's runner, which counts the end-of-generation token too
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                reason = "stop"
                break
            stats["context"].append(token)
            pending += decoder.decode(llm.detokenize([token], special=True))
            hit = min((pending.find(s) for s in opts.stop if s in pending), default=-1)
            if hit >= 0:
                pending, reason = pending[:hit], "stop"
                break
            keep = _held_back(pending, opts.stop)
            if len(pending) > keep:
                yield pending[:len(pending) - keep]
                pending = pending[len(pending) - keep:]
            if count >= limit:
                break
        generator.close()
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending
        end = time.perf_counter_ns()
        first_at = first_at or end
        stats.update(done_reason=reason, eval_count=count, prompt_eval_duration=max(1, first_at - start),
                     eval_duration=max(1, end - first_at) if count else 0)


def canned_pieces(text: str, prompt: str, tokens_per_second: float, stats: dict) -> Iterator[str]:
    """The `generate_response` fault: fixed text, word pieces as tokens, durations at the configured speed."""
    pieces = re.findall(r"\s*\S+", text) or [text]
    yield from (p for p in pieces if p)
    count = len(pieces)
    stats.update(done_reason="stop", eval_count=count, prompt_eval_count=max(1, len(prompt) // 4), context=[],
                 prompt_eval_duration=1_000_000, eval_duration=int(count * 1e9 / max(tokens_per_second, 1e-6)))


# --- the API ---------------------------------------------------------------------------------------------

def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


def _valid_file_key(key: object) -> bool:
    """Go's fs.ValidPath plus no backslash or colon, as in Ollama's validateCreateFilePath."""
    return (isinstance(key, str) and key not in ("", ".") and not key.startswith("/")
            and not any(ch in key for ch in "\\:") and all(p not in ("", ".", "..") for p in key.split("/")))


def parameters_text(params: dict) -> str:
    """The `parameters` block of /api/show: one `key value` line per value, strings quoted."""
    lines = []
    for key in sorted(params):
        values = params[key] if isinstance(params[key], list) else [params[key]]
        lines += [f"{key:<30} {json.dumps(v)}" for v in values]
    return "\n".join(lines)


def modelfile_text(name: str, blob: Path, m: dict) -> str:
    def arg(value: object) -> str:  # Modelfile quoting: only values with spaces at the ends or newlines
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        return json.dumps(text) if "\n" in text or text != text.strip() else text

    def block(text: str) -> str:  # a value that holds triple quotes cannot go between them: quote it instead
        return json.dumps(text) if '"""' in text else f'"""{text}"""'

    lines = ['# Modelfile generated by "ollama show"', "# To build a new Modelfile based on this, replace FROM with:",
             f"# FROM {name}", "", f"FROM {blob}"]
    if m["template"]:
        lines.append(f"TEMPLATE {block(m['template'])}")
    if m["system"]:
        lines.append(f"SYSTEM {block(m['system'])}")
    for key in sorted(m["parameters"]):
        values = m["parameters"][key] if isinstance(m["parameters"][key], list) else [m["parameters"][key]]
        lines += [f"PARAMETER {key} {arg(v)}" for v in values]
    lines += [f"LICENSE {block(text)}" for text in m["license"]]
    lines += [f"MESSAGE {msg.get('role')} {arg(msg.get('content', ''))}" for msg in m["messages"]]
    return "\n".join(lines) + "\n"


class App:
    """Endpoint logic. A method returns a dict (200), a (status, dict) pair, or, for streaming endpoints, an
    iterator of NDJSON objects; ApiError raised before the iterator starts is a plain HTTP error."""

    def __init__(self, store: Store, version: str, default_seed: int = -1):
        self.store, self.models, self.base_version, self.default_seed = store, Models(store), version, default_seed
        self.lock = threading.Lock()
        self.faults = dict(FAULT_DEFAULTS)
        self.stats = dict.fromkeys(("blob_uploads", "bytes_received", "creates", "copies", "deletes"), 0)

    def version(self) -> str:
        return self.faults["version"] or self.base_version

    def take_fault(self, key: str) -> object:
        with self.lock:
            value, self.faults[key] = self.faults[key], FAULT_DEFAULTS[key]
            return value

    def take_cut(self) -> int | None:
        """The byte count at which to cut this upload, if the cut_upload faults say so."""
        with self.lock:
            cut_after = self.faults["cut_upload_after_bytes"]
            if cut_after is not None:
                self.faults["cut_upload_times"] -= 1
                if self.faults["cut_upload_times"] <= 0:
                    self.faults.update(cut_upload_after_bytes=None, cut_upload_times=1)
            return cut_after

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def set_faults(self, req: dict) -> dict:
        unknown = set(req) - set(FAULT_DEFAULTS) - {"reset"}
        if unknown:
            raise ApiError(400, f"unknown faults: {sorted(unknown)}")
        with self.lock:
            if req.get("reset"):
                self.faults = dict(FAULT_DEFAULTS)
            self.faults.update({k: v for k, v in req.items() if k != "reset"})
            return dict(self.faults)

    def manifest(self, raw: object) -> dict:
        manifest = self.store.get(parse_name(raw))
        if manifest is None:
            raise ApiError(404, f"model '{raw}' not found")
        return manifest

    # -- create --

    def create(self, req: dict) -> Iterator[dict]:
        if version_tuple(self.version()) < (0, 5, 5):
            raise ApiError(400, "path or Modelfile are required")  # what servers before the files API answer
        files = req.get("files") or {}
        if not isinstance(files, dict):
            raise ApiError(400, "files must map file names to digests")
        for key in files:
            if not _valid_file_key(key):
                raise ApiError(400, f"file path must be relative: {key}")
        name = parse_name(req.get("model") or req.get("name"))
        if not files and not req.get("from"):
            raise ApiError(400, "neither 'from' or 'files' was specified")
        digests = {key: parse_digest(value) for key, value in files.items()}
        for key, digest in digests.items():
            if not self.store.has_blob(digest):
                raise ApiError(400, f"blob not found for {key} (digest {digest})")
        if any(not key.endswith(".gguf") for key in digests):
            raise ApiError(400, "unsupported file type: the test server imports only .gguf files")
        if len(digests) > 1:
            raise ApiError(400, "the test server imports exactly one .gguf file")
        try:
            parse_template(req.get("template") or "")
        except TemplateError as exc:
            raise ApiError(400, f"template error: {exc}") from None
        license_ = req.get("license") or []
        return self._create_events(name, req, next(iter(digests.values()), None),
                                   [license_] if isinstance(license_, str) else list(license_))

    def _create_events(self, name: str, req: dict, digest: str | None, license_: list[str]) -> Iterator[dict]:
        base = self.manifest(req["from"]) if req.get("from") else None
        if digest is None:
            digest = base["layers"][0]["digest"]
        else:
            yield {"status": "parsing GGUF"}
        details, _ = read_gguf(self.store.blob_path(digest))
        existed = True
        if req.get("quantize"):
            digest, details, existed = yield from self._quantize(digest, details, str(req["quantize"]))
        model_layer = {"mediaType": MEDIA + "model", "digest": digest,
                       "size": self.store.blob_path(digest).stat().st_size}
        values = {key: req[key] if req.get(key) is not None else (base or {}).get(key, default)
                  for key, default in (("template", ""), ("system", ""), ("parameters", {}), ("messages", []))}
        values["license"] = license_ or (base or {}).get("license", [])
        layers = [model_layer]
        yield {"status": f"{'using existing' if existed else 'creating new'} layer {digest}"}
        for kind in ("template", "system", "license", "params", "messages"):
            value = values["parameters" if kind == "params" else kind]
            if not value:
                continue
            data = (json.dumps(value) if kind in ("params", "messages") else "\n".join(value) if kind == "license"
                    else value).encode()
            layer_digest, existed = self.store.put_bytes(data)
            layers.append({"mediaType": MEDIA + kind, "digest": layer_digest, "size": len(data)})
            yield {"status": f"{'using existing' if existed else 'creating new'} layer {layer_digest}"}
        if message := self.take_fault("create_stream_error"):
            raise ApiError(500, str(message))
        yield {"status": "writing manifest"}
        with self.store.lock:
            old = self.store.get(name)
            self.store.put({"name": name, **values, "layers": layers, "details": details,
                            "size": sum(layer["size"] for layer in layers), "modified_at": now_rfc3339(),
                            "digest": manifest_digest(layers, details)})
            if old:  # like Ollama: the layers the old manifest alone used go away
                self.store.prune(candidates={layer["digest"] for layer in old["layers"]})
        self.models.unload(name)
        self.count("creates")
        yield {"status": "success"}

    def _quantize(self, digest: str, details: dict, wanted: str):
        target = wanted.upper()
        if target not in QUANTIZE_TARGETS:
            raise ApiError(400, f"unsupported quantization type {target} - supported types are "
                                f"F32, F16, BF16, Q4_K_S, Q4_K_M, Q8_0")
        source = details["quantization_level"]
        if source not in FLOAT_SOURCES:
            raise ApiError(400, "quantization is only supported for F16, BF16 and F32 models")
        yield {"status": f"quantizing {source} model to {target}"}
        tmp = quantize_blob(self.store, self.store.blob_path(digest), target)
        new_digest = hash_file(tmp)
        existed = self.store.has_blob(new_digest)
        os.replace(tmp, self.store.blob_path(new_digest))
        details, _ = read_gguf(self.store.blob_path(new_digest))
        return new_digest, details, existed

    # -- model management --

    def tags(self) -> dict:
        models = sorted(self.store.all(), key=lambda m: m["modified_at"], reverse=True)
        return {"models": [{"name": m["name"], "model": m["name"], "modified_at": m["modified_at"], "size": m["size"],
                            "digest": m["digest"], "details": m["details"]} for m in models]}

    def show(self, req: dict) -> dict:
        m = self.manifest(req.get("model") or req.get("name"))
        blob = self.store.blob_path(m["layers"][0]["digest"])
        _, info = read_gguf(blob)
        return {"license": "\n".join(m["license"]), "modelfile": modelfile_text(m["name"], blob, m),
                "parameters": parameters_text(m["parameters"]), "template": m["template"], "system": m["system"],
                "details": m["details"], "model_info": info, "capabilities": ["completion"],
                "modified_at": m["modified_at"]}

    def copy(self, req: dict) -> dict:
        m = self.manifest(req.get("source"))
        self.store.put({**m, "name": parse_name(req.get("destination")), "modified_at": now_rfc3339()})
        self.count("copies")
        return {}

    def delete(self, req: dict) -> dict:
        raw = req.get("model") or req.get("name")
        name = parse_name(raw)
        if not self.store.delete(name):
            raise ApiError(404, f"model '{raw}' not found")
        self.models.unload(name)
        self.count("deletes")
        return {}

    # -- generate / chat --

    def generate(self, req: dict, chat: bool) -> Iterator[dict]:
        raw = req.get("model")
        m = self.manifest(raw)
        name = m["name"]
        keep_alive = parse_keep_alive(req.get("keep_alive"))
        messages = req.get("messages") or []
        prompt_given = bool(messages) if chat else bool(req.get("prompt"))
        if self.faults["fail_generate"]:
            raise ApiError(500, "injected failure")
        if not prompt_given:  # Ollama: an empty request only loads (or, with keep_alive 0, unloads) the model
            if keep_alive == 0:
                self.models.unload(name)
                return iter([self._final(raw, chat, "unload", "", {}, 0, 0)])
            opts = sampling_options(m["parameters"], req.get("options"), self.default_seed)
            _, load_ns = self.models.load(name, m, opts.num_ctx, keep_alive)
            return iter([self._final(raw, chat, "load", "", {}, load_ns, load_ns)])
        # Like Ollama: the model's SYSTEM unless the request brings its own, then the model's MESSAGE history.
        if not chat:
            system = req.get("system") or m["system"]
            messages = [*([{"role": "system", "content": system}] if system else []), *m["messages"],
                        {"role": "user", "content": req["prompt"]}]
        else:
            messages = [*m["messages"], *messages]
            if m["system"] and messages[0].get("role") != "system":
                messages.insert(0, {"role": "system", "content": m["system"]})
        try:
            template = req.get("template") or m["template"]
            prompt = req["prompt"] if req.get("raw") and not chat else render_prompt(template, messages)
        except TemplateError as exc:
            raise ApiError(500, f"template: {exc}") from None
        opts = sampling_options(m["parameters"], req.get("options"), self.default_seed)
        canned = self.faults["generate_response"]
        stats: dict = {}
        start = time.perf_counter_ns()
        if canned is not None:
            pieces, load_ns = canned_pieces(str(canned), prompt, self.faults["generate_tokens_per_second"], stats), 0
        else:
            loaded, load_ns = self.models.load(name, m, opts.num_ctx, keep_alive)
            pieces = generate_pieces(loaded, prompt, opts, stats)
        return self._generate_events(raw, name, chat, req.get("stream", True) is not False, pieces, stats,
                                     start, load_ns, keep_alive)

    def _generate_events(self, raw, name, chat, stream, pieces, stats, start, load_ns, keep_alive) -> Iterator[dict]:
        text = []
        for piece in pieces:
            text.append(piece)
            if stream:
                yield self._chunk(raw, chat, piece)
        if keep_alive == 0:
            self.models.unload(name)
        yield self._final(raw, chat, stats["done_reason"], "" if stream else "".join(text), stats, load_ns,
                          time.perf_counter_ns() - start + load_ns)

    @staticmethod
    def _chunk(raw: str, chat: bool, text: str, **extra) -> dict:
        body = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
        return {"model": raw, "created_at": now_rfc3339(), **body, "done": False, **extra}

    def _final(self, raw, chat, reason, text, stats, load_ns, total_ns) -> dict:
        timing = {"total_duration": max(total_ns, 1), "load_duration": load_ns}
        if stats:
            timing.update({k: stats[k] for k in ("prompt_eval_count", "prompt_eval_duration", "eval_count",
                                                 "eval_duration")})
            if not chat:
                timing["context"] = stats["context"]
        final = self._chunk(raw, chat, text, done_reason=reason, **timing)
        final["done"] = True
        return final


# --- HTTP ------------------------------------------------------------------------------------------------

class _Dropped(Exception):
    """The connection is gone (or was cut on purpose): send nothing more."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ollama-test-server"
    app: App  # set on the subclass by serve()

    ROUTES = {
        ("GET", "/api/version"): lambda app, req: {"version": app.version()},
        ("GET", "/api/tags"): lambda app, req: app.tags(),
        ("GET", "/api/ps"): lambda app, req: {"models": app.models.ps()},
        ("POST", "/api/show"): App.show,
        ("POST", "/api/copy"): App.copy,
        ("DELETE", "/api/delete"): App.delete,
        ("POST", "/api/create"): App.create,
        ("POST", "/api/generate"): lambda app, req: app.generate(req, chat=False),
        ("POST", "/api/chat"): lambda app, req: app.generate(req, chat=True),
        ("POST", "/_test/faults"): App.set_faults,
        ("GET", "/_test/faults"): lambda app, req: dict(app.faults),
        ("GET", "/_test/stats"): lambda app, req: dict(app.stats),
    }

    def log_message(self, format: str, *args) -> None:
        log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/" and method in ("GET", "HEAD"):  # Ollama's health check
                self._reply(200, None, text=b"Ollama is running")
            elif path.startswith("/api/blobs/"):
                self._blob(method, path[len("/api/blobs/"):])
            elif (method, path) in self.ROUTES:
                self._api(self.ROUTES[method, path], method)
            else:
                self._discard_body()
                if any(p == path for _, p in self.ROUTES):
                    self._reply(405, {"error": "405 method not allowed"})
                else:
                    self._reply(404, {"error": "404 page not found"})
        except ApiError as exc:
            self._reply(exc.status, {"error": str(exc)})
        except _Dropped as exc:
            log(f"{method} {path}: connection dropped ({exc})")
            self.close_connection = True
        except Exception as exc:  # a bug here must still answer, and show in the log
            log(f"{method} {path}: {traceback.format_exc()}")
            self._reply(500, {"error": f"internal error: {exc}"}, close=True)

    # -- plumbing --

    def _reply(self, status: int, body: dict | None, *, close: bool = False, text: bytes | None = None) -> None:
        data = text if text is not None else b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _body_chunks(self, limit: int | None = None) -> Iterator[bytes]:
        """The request body in pieces of at most 1 MiB, from Content-Length or chunked transfer encoding.
        A body that ends early raises _Dropped; `limit` stops after that many bytes."""
        def read(n: int) -> bytes:
            data = self.rfile.read(n)
            if len(data) < n:
                raise _Dropped("body ended early")
            return data

        def sized(length: int) -> Iterator[bytes]:
            while length > 0:
                data = read(min(CHUNK, length))
                length -= len(data)
                yield data

        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            pieces = self._chunked(read, sized)
        else:
            pieces = sized(int(self.headers.get("Content-Length") or 0))
        total = 0
        for piece in pieces:
            if limit is not None and total + len(piece) >= limit:
                yield piece[:limit - total]
                return
            total += len(piece)
            yield piece

    def _chunked(self, read, sized) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise _Dropped("chunk header ended early")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return
            yield from sized(size)
            read(2)  # CRLF after the chunk

    def _discard_body(self) -> dict:
        """Read what the client sent, so that the connection stays usable for its next request."""
        for _ in self._body_chunks():
            pass
        return {}

    def _json(self) -> dict:
        data = b"".join(self._body_chunks())
        if not data:
            raise ApiError(400, "missing request body")
        try:
            body = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _api(self, route, method: str) -> None:
        req = self._json() if method in ("POST", "DELETE") else self._discard_body()
        result = route(self.app, req)
        if isinstance(result, tuple):
            self._reply(*result)
        elif isinstance(result, dict):
            self._reply(200, result)
        elif req.get("stream", True) is False:
            self._collect(result)
        else:
            self._stream(result)

    def _collect(self, events: Iterator[dict]) -> None:
        """`"stream": false`: the last object is the answer, an error becomes the HTTP status."""
        last: dict = {}
        try:
            for event in events:
                last = event
        except ApiError as exc:
            return self._reply(exc.status, {"error": str(exc)})
        except Exception as exc:  # e.g. llama.cpp failing halfway
            log(traceback.format_exc())
            return self._reply(500, {"error": str(exc)})
        self._reply(200, last)

    def _stream(self, events: Iterator[dict]) -> None:
        """NDJSON in chunked encoding; an error after the headers is a last `{"error": ...}` line."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            try:
                for event in events:
                    self._write_chunk(json.dumps(event).encode() + b"\n")
            except Exception as exc:  # any failure after the headers is an error line
                if not isinstance(exc, ApiError):
                    log(traceback.format_exc())
                self._write_chunk(json.dumps({"error": str(exc)}).encode() + b"\n")
            self._write_chunk(b"")
        except OSError:  # the client went away: stop generating
            self.close_connection = True
        finally:
            if hasattr(events, "close"):
                events.close()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # -- blobs --

    def _blob(self, method: str, raw_digest: str) -> None:
        if method not in ("HEAD", "POST"):
            return self._reply_unread(405, {"error": "405 method not allowed"}, method)
        try:
            digest = parse_digest(raw_digest)
        except ApiError as exc:
            return self._reply_unread(exc.status, {"error": str(exc)}, method)
        store = self.app.store
        if method == "HEAD":
            return self._reply(200 if store.has_blob(digest) else 404, None)
        if store.has_blob(digest):
            return self._reply_unread(200, None, method)
        self._upload(digest)

    def _reply_unread(self, status: int, body: dict | None, method: str) -> None:
        """Answer without reading the body, then close: the unread body would corrupt the next request.
        The rest of the body is drained and discarded (a "lingering close"), so the client, which sends its
        whole body before it reads the answer, gets the answer instead of a connection reset."""
        has_body = method == "POST" and (self.headers.get("Content-Length", "0") != "0"
                                         or "Transfer-Encoding" in self.headers)
        self._reply(status, body, close=has_body)
        if has_body:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and select.select([self.connection], [], [], 5)[0]:
                    if not self.connection.recv(CHUNK):
                        break

    def _upload(self, digest: str) -> None:
        app, store = self.app, self.app.store
        cut_after = app.take_cut()
        tmp = store.new_temp()
        h, received = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as f:
                for piece in self._body_chunks(limit=cut_after):
                    h.update(piece)
                    f.write(piece)
                    received += len(piece)
            if cut_after is not None:
                log(f"fault: cutting the upload of {digest} after {received} bytes")
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                raise _Dropped("cut on purpose")
            if "sha256:" + h.hexdigest() != digest:
                raise ApiError(400, "digest mismatch")
            os.replace(tmp, store.blob_path(digest))
            app.count("blob_uploads")
        finally:
            tmp.unlink(missing_ok=True)
            app.count("bytes_received", received)
        self._reply(201, None)


def serve(host: str, port: int, data: Path, version: str, seed: int = -1) -> None:
    store = Store(data)
    for leftover in store.tmp.iterdir():  # partial uploads of a server that was killed
        leftover.unlink()
    if not os.environ.get("OLLAMA_NOPRUNE"):
        log(f"pruned {store.prune()} unreferenced blobs")
    handler = type("BoundHandler", (Handler,), {"app": App(store, version, seed)})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    print(f"listening on http://{host}:{httpd.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        httpd.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.ollama_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--data", type=Path, required=True, help="blobs and manifests; kept across restarts")
    parser.add_argument("--version", default="0.32.15", help="what /api/version reports")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed when a request sets none (default 0, so test runs repeat); "
                             "-1 draws one per request, like Ollama")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.data, args.version, args.seed)


# --- starting servers from tests -------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


class OllamaTestServer:
    """One server process: OllamaTestServer(data_dir).start() -> url; .stop(); .restart(); .faults(...); .stats()."""

    __test__ = False  # not a pytest test class

    def __init__(self, data_dir: Path, *, version: str = "0.32.15", host: str = "127.0.0.1", seed: int = 0):
        self.data_dir, self.version, self.host, self.seed = Path(data_dir), version, host, seed
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30) -> str:
        """Start the process and wait for its `listening on` line; returns the base URL."""
        if self.proc is not None:
            raise RuntimeError(f"already running at {self.url}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tests.ollama_server", "--port", "0", "--host", self.host,
                   "--data", str(self.data_dir), "--version", self.version, "--seed", str(self.seed)]
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log_file,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"ollama test server did not start ({line!r}); see {self.log_path}:\n"
                               + self.log_path.read_text()[-2000:])
        self.url = line.split()[-1]
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc = None

    def restart(self) -> str:
        """Stop and start on the same data directory (a new port): models survive, unused blobs are pruned."""
        self.stop()
        return self.start()

    def faults(self, **faults) -> dict:
        import httpx

        return httpx.post(f"{self.url}/_test/faults", json=faults, timeout=10).raise_for_status().json()

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/_test/stats", timeout=10).raise_for_status().json()

    def __enter__(self) -> OllamaTestServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerPool:
    """What an `ollama_hosts` fixture wraps: pool.start(n) -> n new base URLs; pool.server(url); pool.stop_all()."""

    def __init__(self, base_dir: Path, version: str = "0.32.15"):
        self.base_dir, self.version, self.servers = Path(base_dir), version, []

    def start(self, n: int = 1, **kwargs) -> list[str]:
        new = [OllamaTestServer(self.base_dir / f"host-{len(self.servers) + i}", version=self.version, **kwargs)
               for i in range(n)]
        self.servers += new
        return [server.start() for server in new]

    def server(self, url: str) -> OllamaTestServer:
        return next(s for s in self.servers if s.url == url.rstrip("/"))

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


if __name__ == "__main__":
    main()
