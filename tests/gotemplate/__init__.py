"""Go's text/template for the Ollama test server, from the small Go program next to this file (main.go, with
api/ and template/: Ollama's request and template data types, so that templates see what they see in Ollama).

The program is built with `go build` on first use into REPO/.cache/gotemplate/<hash of its sources>/gotemplate
(staged, fsynced, then renamed into place, so servers starting at the same time never see half a binary; the
directory can be moved with SO8T_GOTEMPLATE_CACHE), and a server runs one copy of it as a long-lived child that
answers JSON lines (see main.go for the protocol).

A machine needs Debian's golang-go (Go >= 1.19, standard library only, no network) unless that cache already
holds the binary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from so8t_deploy.fsutil import fsync_tree

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("go.mod", "main.go", "api/types.go", "template/types.go")
CACHE_ROOT = Path(os.environ.get("SO8T_GOTEMPLATE_CACHE") or SOURCE_DIR.parents[1] / ".cache" / "gotemplate")
INSTALL_HINT = "apt-get install golang-go"


class GoToolchainMissing(RuntimeError):
    """Neither a cached helper binary nor a `go` command to build one."""


class TemplateError(ValueError):
    """A template that Go's text/template refuses to parse or to execute; the message is Go's."""


def source_hash(source_dir: Path = SOURCE_DIR, sources: tuple[str, ...] = SOURCES) -> str:
    h = hashlib.sha256()
    for name in sources:
        h.update(name.encode() + b"\0" + (source_dir / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def binary_path(cache_root: Path = CACHE_ROOT) -> Path:
    return cache_root / source_hash() / "gotemplate"


def ensure_binary(cache_root: Path = CACHE_ROOT) -> Path:
    """The helper binary, built first if this source version has no cached build."""
    return build_go_program(SOURCE_DIR, binary_path(cache_root))


def build_go_program(source_dir: Path, target: Path) -> Path:
    """`go build` of the standard-library-only program in `source_dir` to `target` (a path whose directory
    names the sources' hash), unless already there: staged, fsynced, then renamed into place, so that processes
    starting at the same time never see half a binary."""
    if target.is_file():
        return target
    go = shutil.which("go")
    if go is None:
        raise GoToolchainMissing(f"the Ollama test server needs the Go toolchain: {INSTALL_HINT}")
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent.parent, prefix=f".{target.parent.name}-"))
    try:
        env = {**os.environ, "CGO_ENABLED": "0", "GO111MODULE": "on", "GOFLAGS": "-buildvcs=false -mod=mod",
               "GOCACHE": str(CACHE_ROOT / "go-build"), "GOPATH": str(CACHE_ROOT / "gopath")}
        built = subprocess.run([go, "build", "-trimpath", "-o", str(staging / target.name), "."],
                               cwd=source_dir, env=env, capture_output=True, text=True, timeout=600)
        if built.returncode != 0:
            raise RuntimeError(f"go build of {source_dir} failed:\n{built.stderr.strip()}")
        fsync_tree(staging)
        try:
            os.rename(staging, target.parent)
        except OSError:  # another process published the same build first
            if not target.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def end_child(proc: subprocess.Popen, timeout: float) -> None:
    """Ask a child to end (stdin closed, or SIGTERM when it has no stdin pipe), kill it after `timeout` seconds,
    reap it and close its pipes."""
    if proc.stdin is not None:
        proc.stdin.close()
    else:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


class GoTemplates:
    """One helper process, started on first use and shared by the server's threads (one call at a time)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _call(self, request: dict) -> dict:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen([str(ensure_binary())], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE)
            try:
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except OSError:
                line = b""
            if not line:
                raise RuntimeError(f"the gotemplate helper exited ({self._proc.poll()})")
            return json.loads(line)

    def parse(self, template: str) -> list[str]:
        """The template's identifiers, lower-cased; raises TemplateError as Ollama's template.Parse fails."""
        answer = self._call({"op": "parse", "template": template})
        if "error" in answer:
            raise TemplateError(answer["error"])
        return answer.get("vars") or []

    def render(self, template: str, messages: list[dict], *, prompt: str = "", suffix: str = "",
               tools: list[dict] | None = None, think: bool | str | None = None) -> str:
        """The prompt Ollama's Template.Execute builds from these messages (or from prompt + suffix), with the
        request's tools (Ollama's API form; None is no tools) and think (None: not set; a bool or a level)."""
        request = {"op": "render", "template": template, "messages": messages, "prompt": prompt, "suffix": suffix}
        if tools is not None:
            request["tools"] = tools
        if think is not None:
            request["think_value"] = think
        answer = self._call(request)
        if "error" in answer:
            raise TemplateError(answer["error"])
        return answer["text"]

    def show_parameters(self, parameters: dict) -> tuple[list[str], list[str]]:
        """Go's own `%-30s %#v` lines and `%s %v` pairs for these parameters, sorted."""
        answer = self._call({"op": "show_parameters", "parameters": parameters})
        return answer.get("lines") or [], answer.get("values") or []

    def json(self, value: object) -> str:
        """Go's json.Marshal of value (as Go decoded it from JSON)."""
        return self._call({"op": "json", "value": value})["text"]

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                end_child(self._proc, timeout=5)  # it exits at the end of its input
                self._proc = None
