"""How Ollama's Go code prints a value that came through encoding/json, reproduced in Python.

After `json.Unmarshal` into `any`, numbers are float64, objects map[string]any and arrays []any. Ollama prints
such values with fmt (`%#v` in /api/show `parameters`, `%v` in the Modelfile text) and stores them with
encoding/json (the params and messages layers, the manifest). The helper in this directory runs the real Go
code for the tests to compare against (see test_ollama_server.py).
"""

from __future__ import annotations

import math
import re
import unicodedata

_SURROGATES = re.compile("[\ud800-\udfff]")
_FMT_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                 "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_string(text: str) -> str:
    """A JSON string as Go holds it: unpaired surrogates (which Go's decoder cannot keep) become U+FFFD."""
    return _SURROGATES.sub("\ufffd", text)


def _digits(x: float) -> tuple[str, int]:
    """The shortest decimal digits that read back as |x|, and the decimal point position (x = 0.DIGITS × 10^dp).
    Python's repr and Go's strconv both pick the shortest round-trip digits."""
    if x == 0:
        return "0", 1
    mantissa, _, exponent = repr(abs(x)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits, point = whole + fraction, len(whole) + int(exponent or 0)
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    return stripped.rstrip("0") or "0", point


def _exponent_form(digits: str, point: int) -> str:
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    exp = point - 1
    return f"{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"


def _fixed_form(digits: str, point: int) -> str:
    if point <= 0:
        return "0." + "0" * -point + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return digits[:point] + "." + digits[point:]


def format_float(x: float) -> str:
    """fmt's %v (and %#v) of a float64: strconv's 'g' with the shortest digits, where the exponent form is used
    when the exponent is below -4 or at least 6 (so 1048576 prints as 1.048576e+06 but 123456 stays)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    digits, point = _digits(x)
    sign = "-" if math.copysign(1, x) < 0 else ""
    exp = point - 1
    return sign + (_exponent_form(digits, point) if exp < -4 or exp >= 6 else _fixed_form(digits, point))


def _is_print(ch: str) -> bool:
    """Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def quote(text: str) -> str:
    """strconv.Quote: Go-escaped, printable runes kept, others as \\xNN, \\uNNNN or \\UNNNNNNNN."""
    out = ['"']
    for ch in go_string(text):
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif _is_print(ch):
            out.append(ch)
        elif ch in _FMT_ESCAPES:
            out.append(_FMT_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _kind(value: object) -> str:
    """The Go type json.Unmarshal gives a value: nil, bool, float64, string, []any or map[string]any."""
    for kind, types in (("bool", bool), ("float64", int | float), ("string", str), ("slice", list | tuple),
                        ("map", dict)):
        if isinstance(value, types):
            return kind
    if value is None:
        return "nil"
    raise TypeError(f"not a JSON value: {value!r}")


def _sorted_keys(mapping: dict) -> list[str]:
    return sorted(mapping, key=go_string)  # Go sorts map keys by their bytes


def sharp_v(value: object) -> str:
    """fmt's %#v of a JSON-decoded value."""
    kind = _kind(value)
    if kind == "slice":
        return "[]interface {}{" + ", ".join(sharp_v(v) for v in value) + "}"
    if kind == "map":
        items = (f"{quote(k)}:{sharp_v(value[k])}" for k in _sorted_keys(value))
        return "map[string]interface {}{" + ", ".join(items) + "}"
    if kind == "string":
        return quote(value)
    if kind == "float64":
        return format_float(float(value))
    return "<nil>" if value is None else str(value).lower()


def plain_v(value: object) -> str:
    """fmt's %v of a JSON-decoded value."""
    kind = _kind(value)
    if kind == "slice":
        return "[" + " ".join(plain_v(v) for v in value) + "]"
    if kind == "map":
        return "map[" + " ".join(f"{go_string(k)}:{plain_v(value[k])}" for k in _sorted_keys(value)) + "]"
    return go_string(value) if kind == "string" else sharp_v(value)


def _json_float(x: float) -> str:
    """encoding/json's float64: fixed notation unless below 1e-6 or from 1e21 up; e-09 shortened to e-9."""
    if math.isnan(x) or math.isinf(x):
        raise ValueError(f"json: unsupported value: {x}")
    digits, point = _digits(x)
    sign = "-" if math.copysign(1, x) < 0 else ""
    if x != 0 and (abs(x) < 1e-6 or abs(x) >= 1e21):
        return sign + re.sub(r"e-0(\d)$", r"e-\1", _exponent_form(digits, point))
    return sign + _fixed_form(digits, point)


def _json_str(text: str) -> str:
    out = ['"']
    for ch in go_string(text):
        if ch in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_json(value: object, *, sort_keys: bool = True) -> str:
    """encoding/json's Marshal. Dicts are maps (keys sorted) unless sort_keys is False: then they stand for
    structs, whose fields keep their declared (insertion) order."""
    kind = _kind(value)
    if kind == "slice":
        return "[" + ",".join(go_json(v, sort_keys=sort_keys) for v in value) + "]"
    if kind == "map":
        keys = _sorted_keys(value) if sort_keys else list(value)
        return "{" + ",".join(f"{_json_str(k)}:{go_json(value[k], sort_keys=sort_keys)}" for k in keys) + "}"
    if kind == "string":
        return _json_str(value)
    if kind == "float64":
        return _json_float(float(value))
    return "null" if value is None else str(value).lower()
