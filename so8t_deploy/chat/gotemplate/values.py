"""Go values as templates see them, and fmt's printing of them.

Python's str, bool, int, float, list ([]interface {}) and dict (map[string]interface {}) stand for themselves;
None is Go's invalid reflect.Value (a missing value), NIL a nil interface{}, Iface a non-nil one; GoValue carries
a GoType for Go's named types, structs and pointers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


class GoTemplateError(ValueError):
    """A template Go refuses to parse or execute; the message is Go's."""


class GoFuncError(Exception):
    """Raised by a template function; Go reports it as `error calling NAME: MESSAGE`."""


class GoType:
    """A Go type: its name as reflect prints it, its kind, the element type (slice, map, pointer) or the struct
    fields (name, type, json tag); `string` is its String() method, `methods` other methods without arguments,
    `marshal` its MarshalJSON."""

    def __init__(self, name: str, kind: str, elem: GoType | None = None,
                 fields: tuple[tuple[str, GoType, str], ...] = (), string: Callable[[Any], str] | None = None,
                 methods: Mapping[str, Callable[[Any], Any]] | None = None,
                 marshal: Callable[[Any], str] | None = None) -> None:
        self.name, self.kind, self.elem, self.fields = name, kind, elem, fields
        self.string, self.methods, self.marshal = string, dict(methods or {}), marshal

    def __repr__(self) -> str:
        return f"GoType({self.name})"


@dataclass(eq=False)
class GoValue:
    """A value of a GoType: a list or None (slice), a dict or None (map), a dict of fields (struct), the GoValue
    pointed to or None (pointer), or the Python value of a named basic type."""

    type: GoType
    data: Any


class _Nil:
    def __repr__(self) -> str:
        return "NIL"


NIL: Any = _Nil()


@dataclass(eq=False)
class Iface:
    """A non-nil interface{} holding a value, as reflect returns an element of []interface{} or
    map[string]interface{} or an interface field: only the type in some error messages tells it apart."""

    value: Any


def concrete(v: Any) -> Any:
    """Go's indirectInterface: the value an interface holds (None for a nil one)."""
    return v.value if isinstance(v, Iface) else None if v is NIL else v


MISSING: Any = object()  # no final argument: a command that is no pipeline's later stage
ANY = GoType("interface {}", "interface")
STRING, BOOL, INT = GoType("string", "string"), GoType("bool", "bool"), GoType("int", "int")
FLOAT64, UINT8 = GoType("float64", "float64"), GoType("uint8", "uint8")
ANY_SLICE, ANY_MAP = GoType("[]interface {}", "slice", ANY), GoType("map[string]interface {}", "map", ANY)
_BASIC = ((bool, BOOL), (str, STRING), (int, INT), (float, FLOAT64), (list, ANY_SLICE), (dict, ANY_MAP))
_ZERO = {"string": "", "bool": False, "int": 0, "uint8": 0, "float64": 0.0, "interface": NIL}


def type_of(v: Any) -> GoType:
    """The Go type of a value (interface {} for nil and interface values)."""
    if isinstance(v, GoValue):
        return v.type
    if isinstance(v, Iface):
        return ANY
    return next((t for py, t in _BASIC if isinstance(v, py)), ANY)


def type_name(v: Any) -> str:
    return type_of(v).name


def zero(t: GoType) -> Any:
    """Go's zero value of t."""
    if t.kind in _ZERO:
        return _ZERO[t.kind] if t in (STRING, BOOL, INT, FLOAT64, ANY) else GoValue(t, _ZERO[t.kind])
    if t.kind == "struct":
        return GoValue(t, {name: zero(ft) for name, ft, _ in t.fields})
    return GoValue(t, None)


def indirect(v: Any) -> tuple[Any, bool]:
    """Through pointers and interfaces: the value, and whether a nil stopped the way."""
    if v is NIL:
        return v, True
    v = concrete(v)
    if isinstance(v, GoValue) and v.type.kind == "ptr":
        return (v, True) if v.data is None else (v.data, False)
    return v, False


def seq_of(v: Any) -> list[Any] | None:
    """The elements of a slice (empty for a nil one), None for anything else."""
    if isinstance(v, list):
        return v
    if isinstance(v, GoValue) and v.type.kind == "slice":
        return v.data or []
    return None


def map_of(v: Any) -> dict[Any, Any] | None:
    """The entries of a map (empty for a nil one), None for anything else."""
    if isinstance(v, dict):
        return v
    if isinstance(v, GoValue) and v.type.kind == "map":
        return v.data if v.data is not None else {}
    return None


def element(v: Any, t: GoType | None) -> Any:
    """An element or field of type t as reflect returns it: interfaces stay interfaces."""
    if t is None or t.kind != "interface":
        return v
    return NIL if v is None else Iface(v)


def elem_type(container: Any) -> GoType:
    return type_of(container).elem or ANY


def truth(v: Any) -> bool:
    """Go's template truth: non-zero numbers, non-empty strings, slices and maps, non-nil pointers, structs."""
    v = concrete(v)
    v = v.data if isinstance(v, GoValue) and v.type.kind not in ("slice", "map", "ptr", "struct") else v
    if v is None:
        return False
    if isinstance(v, GoValue):
        return v.type.kind == "struct" or (v.data is not None and (v.type.kind == "ptr" or len(v.data) > 0))
    return bool(v)


def fmt_float(x: float, fmt: str = "g") -> str:
    """strconv.FormatFloat(x, fmt, -1, 64) for fmt "g" (fmt's %v: the exponent form below 1e-4 and from 1e6 on),
    "e" or "f". Python's repr has the same shortest round-trip digits as Go's strconv."""
    if math.isnan(x) or math.isinf(x):
        return "NaN" if math.isnan(x) else ("+Inf" if x > 0 else "-Inf")
    sign, digits, exp = Decimal(repr(x)).normalize().as_tuple()
    text, point = "".join(map(str, digits)), len(digits) + int(exp)
    point = 1 if text == "0" else point
    if fmt == "g":
        fmt = "e" if not -4 <= point - 1 < 6 else "f"
    if fmt == "e":
        e = point - 1
        body = text[0] + ("." + text[1:] if len(text) > 1 else "") + f"e{'-' if e < 0 else '+'}{abs(e):02d}"
    elif point <= 0:
        body = "0." + "0" * -point + text
    else:
        body = text[:point] + "0" * (point - len(text)) + ("." + text[point:] if point < len(text) else "")
    return ("-" if sign else "") + body


def fmt_v(v: Any, depth: int = 0) -> str:
    """fmt's %v of a value, calling String() methods as fmt does."""
    v = concrete(v)
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return fmt_float(v)
    t = type_of(v)
    if t.string is not None:
        return t.string(v.data)
    data = v.data if isinstance(v, GoValue) else v
    if t.kind == "ptr":
        if data is None:
            return "<nil>"
        if depth or data.type.kind != "struct":
            raise GoTemplateError(f"printing a pointer ({t.name}) is not supported: Go prints its address")
        return "&" + fmt_v(data, depth + 1)
    if t.kind == "struct":
        return "{" + " ".join(fmt_v(data[name], depth + 1) for name, _, _ in t.fields) + "}"
    if t.kind == "slice":
        return "[" + " ".join(fmt_v(x, depth + 1) for x in data or ()) + "]"
    if t.kind == "map":
        items = sorted((data or {}).items())
        return "map[" + " ".join(f"{fmt_v(k, depth + 1)}:{fmt_v(x, depth + 1)}" for k, x in items) + "]"
    return fmt_v(data, depth)


_QUOTE_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
                  "\\": "\\\\", '"': '\\"'}


def go_quote(s: str) -> str:
    """strconv.Quote (fmt's %q of a string)."""
    out = []
    for ch in s:
        code = ord(ch)
        if ch in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[ch])
        elif 0xD800 <= code < 0xE000:
            out.append("\ufffd" if code < 0xDC80 else f"\\x{code - 0xDC00:02x}")  # a byte (surrogateescape)
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def fmt_rune(ch: str) -> str:
    """fmt's %#U."""
    return f"U+{ord(ch):04X}" + (f" '{ch}'" if ch.isprintable() else "")


@dataclass(frozen=True)
class GoFunc:
    """A template function and its Go signature: each parameter is "value" (a reflect.Value: any value, NIL
    kept), "any" (an interface{}: nil values arrive as None) or "string"; `variadic` is the kind of a final
    ...parameter."""

    fn: Callable[..., Any]
    params: tuple[str, ...]
    variadic: str | None = None
