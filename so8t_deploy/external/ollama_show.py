"""What `/api/show` says about a model, typed: its template, system prompt, parameters and GGUF keys.

Ollama prints the `parameters` block with Go's `fmt.Sprintf("%-30s %#v", key, value)`, one line
per value, in map order, after the values went through a JSON round trip (numbers are float64):
`num_ctx 4096`, `num_batch 1.048576e+06`, `stop "<|end|>"`, `stop "a\\x1bb"`. That is not JSON,
so it is read here with Go's own rules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..manifest.modelfile import ModelfileSyntaxError, parse_modelfile

_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
                   "'": "'", '"': '"'}


def go_unquote(text: str) -> str:
    """The string a Go-quoted literal (strconv.Quote's output) stands for; ValueError if it is not one."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ValueError(f"not a Go string literal: {text[:40]!r}")
    out, i, body = bytearray(), 0, text[1:-1]
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        kind = body[i + 1] if i + 1 < len(body) else ""
        if kind in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[kind].encode()
            i += 2
        elif kind == "x":
            out.append(int(body[i + 2:i + 4], 16))  # a raw byte: strconv.Quote writes invalid UTF-8 this way
            i += 4
        elif kind in ("u", "U"):
            width = 4 if kind == "u" else 8
            out += chr(int(body[i + 2:i + 2 + width], 16)).encode("utf-8")
            i += 2 + width
        elif kind.isdigit():
            out.append(int(body[i + 1:i + 4], 8))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{kind} in a Go string literal")
    return out.decode("utf-8", errors="replace")


def parse_go_value(text: str) -> Any:
    """One value as Go's %#v prints it: a quoted string, a bool, a number; anything else stays text."""
    text = text.strip()
    if text.startswith('"'):
        try:
            return go_unquote(text)
        except ValueError:
            return text
    if text in ("true", "false"):
        return text == "true"
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf"))
    if _NUMBER_RE.match(text):
        number = float(text)
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    return text


def parse_show_parameters(block: str) -> dict[str, Any]:
    """/api/show's `parameters` text as a dict; repeated keys (stop) become lists."""
    values: dict[str, list[Any]] = {}
    for line in block.splitlines():
        key, _, raw = line.strip().partition(" ")
        if key:
            values.setdefault(key, []).append(parse_go_value(raw))
    return {key: items if key == "stop" or len(items) > 1 else items[0] for key, items in values.items()}


def same_parameters(wanted: dict[str, Any], seen: dict[str, Any]) -> bool:
    """Equal option sets, numbers compared as the float64 values Ollama stores them as."""
    if set(wanted) != set(seen):
        return False
    for key, value in wanted.items():
        other = seen[key]
        if isinstance(value, list) or isinstance(other, list):
            if list(value if isinstance(value, list) else [value]) != list(
                    other if isinstance(other, list) else [other]):
                return False
        elif isinstance(value, bool) or isinstance(other, bool):
            if value is not other:
                return False
        elif isinstance(value, int | float) and isinstance(other, int | float):
            if not math.isclose(float(value), float(other), rel_tol=1e-12, abs_tol=0.0):
                return False
        elif value != other:
            return False
    return True


def modelfile_template(modelfile: str) -> str | None:
    """The TEMPLATE of /api/show's `modelfile`: what the model was created with, whichever template the host
    renders (`template` is the GGUF's Jinja one when the host prefers it). None if there is none to read."""
    try:
        commands = parse_modelfile(modelfile)
    except ModelfileSyntaxError:
        return None
    return next((c.args for c in commands if c.name == "template"), None)


@dataclass(frozen=True)
class ShownModel:
    template: str  # the template the host renders with
    system: str | None
    parameters: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, str] = field(default_factory=dict)  # GGUF keys, every value as text
    created_template: str | None = None  # the TEMPLATE it was created with (from `modelfile`)
    capabilities: tuple[str, ...] | None = None  # None: the host does not say

    @property
    def sent_template(self) -> str:
        return self.template if self.created_template is None else self.created_template

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShownModel:
        info = data.get("model_info") or {}
        capabilities = data.get("capabilities")
        return cls(template=str(data.get("template") or ""), system=data.get("system") or None,
                   parameters=parse_show_parameters(str(data.get("parameters") or "")),
                   model_info={str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else {},
                   created_template=modelfile_template(str(data.get("modelfile") or "")),
                   capabilities=tuple(str(c) for c in capabilities) if isinstance(capabilities, list) else None)
