"""Model names as Ollama parses them (types/model/name.go), file paths and durations as Go checks them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .common import ApiError

# --- model names (types/model/name.go) ------------------------------------------------------------------

MISSING = "!MISSING!"


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, raw: object) -> ModelName | None:
        """Ollama's ParseName with the defaults merged in; None when a part is missing or not allowed."""
        if not isinstance(raw, str):
            return None
        host, namespace, model, tag = _parse_bare(raw)
        name = cls(host or "registry.ollama.ai", namespace or "library", model, tag or "latest")
        return name if name.is_valid() else None

    def is_valid(self) -> bool:
        return all(_valid_part(kind, part) for kind, part in
                   zip(("host", "namespace", "model", "tag"), self.parts(), strict=True))

    def parts(self) -> tuple[str, str, str, str]:
        return self.host, self.namespace, self.model, self.tag

    def display(self) -> str:
        """DisplayShortest: model:tag, with the namespace (and host) when they are not the defaults."""
        if self.host.lower() != "registry.ollama.ai":
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != "library":
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def same(self, other: ModelName) -> bool:
        return all(a.lower() == b.lower() for a, b in zip(self.parts(), other.parts(), strict=True))


def _cut_last(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or MISSING, s[i + 1:] or MISSING, True


def _parse_bare(s: str) -> tuple[str, str, str, str]:
    tag = ""
    if s.rfind(":") > s.rfind("/"):  # "/" cannot be in a tag, so a later ":" starts one
        s, tag, _ = _cut_last(s, ":")
    s, model, promised = _cut_last(s, "/")
    if not promised:
        return "", "", s, tag
    s, namespace, promised = _cut_last(s, "/")
    if not promised:
        return "", s, model, tag
    scheme, sep, host = s.partition("://")
    return (host if sep else scheme), namespace, model, tag


def _valid_part(kind: str, s: str) -> bool:
    """Parts are ASCII: a letter, digit or underscore first, then also '-', '.' (not in a namespace) and ':'
    (host only); 1 to 80 characters (a host up to 350)."""
    if not 1 <= len(s.encode()) <= (350 if kind == "host" else 80):
        return False
    if not (s[0].isascii() and (s[0].isalnum() or s[0] == "_")):
        return False
    allowed = "_-" + ("" if kind == "namespace" else ".") + (":" if kind == "host" else "")
    return all(ch.isascii() and (ch.isalnum() or ch in allowed) for ch in s[1:])


def valid_file_path(name: object) -> bool:
    """Go's io/fs.ValidPath, which CreateHandler applies to every `files` key."""
    if not isinstance(name, str) or re.search("[\ud800-\udfff]", name):
        return False
    return name == "." or all(part not in ("", ".", "..") for part in name.split("/"))


def parse_keep_alive(value: object) -> float | None:
    """Seconds to keep a model loaded (None = forever), like api.Duration: a number is seconds, a string a Go
    duration; negative means forever; absent means OLLAMA_KEEP_ALIVE or 5 minutes."""
    if value is None:
        value = os.environ.get("OLLAMA_KEEP_ALIVE") or "5m"
        if re.fullmatch(r"-?\d+", value):
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ApiError(400, f"Unsupported type: '{type(value).__name__}'")
    seconds = float(value) if not isinstance(value, str) else go_duration(value)
    return None if seconds < 0 else seconds


def go_duration(text: str) -> float:
    """time.ParseDuration, in seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    if body == "0":
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ApiError(400, f'time: invalid duration "{text}"')
    return sign * sum(float(n) * units[u] for n, u in parts)
