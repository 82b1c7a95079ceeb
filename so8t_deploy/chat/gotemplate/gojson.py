"""Go's encoding/json Marshal for template values: HTML-escaping, struct tags, sorted map keys, MarshalJSON.

As of Go 1.22 (Ollama's Go): \\b and \\f escape as such (Go 1.19 wrote \\u0008 and \\u000c).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Any, cast

from .values import NIL, UINT8, GoType, GoValue, fmt_float


class _Unsupported(ValueError):
    """json.Marshal fails (NaN, infinities): Ollama's callers print the empty string then."""


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                 "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_string(s: str) -> str:
    """encoding/json's string form (HTML-escaping, as json.Marshal does; invalid UTF-8 becomes U+FFFD)."""
    out = []
    for ch in s:
        if ch in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[ch])
        elif ch < " " or ch in "<>&":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":
            out.append("\ufffd")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_float(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        raise _Unsupported(f"json: unsupported value: {fmt_float(x)}")
    text = fmt_float(x, "e" if x != 0 and not 1e-6 <= abs(x) < 1e21 else "f")
    return text[:-2] + text[-1] if len(text) >= 4 and text[-4:-1] == "e-0" else text


def _omit(value: Any, t: GoType) -> bool:
    """encoding/json's isEmptyValue for a field of type t."""
    data = value.data if isinstance(value, GoValue) else value
    if t.kind in ("slice", "map", "string"):
        return not data
    return data in (None, NIL) or (t.kind in ("int", "bool", "float64") and not data)


def _json_struct(t: GoType, fields: Mapping[str, Any]) -> str:
    parts = []
    for name, ftype, tag in t.fields:
        key, _, option = tag.partition(",")
        if key == "-" or (option == "omitempty" and _omit(fields[name], ftype)):
            continue
        parts.append(f"{json_string(key or name)}:{go_json(fields[name])}")
    return "{" + ",".join(parts) + "}"


def go_json(v: Any) -> str:
    """json.Marshal of a template value (Go's map key order, struct tags and MarshalJSON methods)."""
    if v is None or v is NIL:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json_string(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _json_float(v)
    if isinstance(v, list):
        return "[" + ",".join(map(go_json, v)) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{json_string(k)}:{go_json(v[k])}" for k in sorted(v)) + "}"
    t, data = v.type, v.data
    if t.marshal is not None:
        return cast(str, t.marshal(data))
    if t.kind == "struct":
        return _json_struct(t, data)
    if data is None or t.kind == "ptr":
        return "null" if data is None else go_json(data)
    if t.kind == "slice" and t.elem is UINT8:
        return json_string(base64.b64encode(bytes(data)).decode())
    if t.kind in ("slice", "map"):
        return go_json(list(data) if t.kind == "slice" else dict(data))
    return go_json(data)


def json_or_empty(v: Any) -> str:
    """`bts, _ := json.Marshal(v); return string(bts)`, as Ollama's String methods and json function do."""
    try:
        return go_json(v)
    except _Unsupported:
        return ""
