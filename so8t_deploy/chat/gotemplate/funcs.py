"""text/template's builtin functions (funcs.go) and the part of fmt.Sprintf templates use."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, cast

from .values import (
    UINT8,
    GoFunc,
    GoFuncError,
    GoType,
    GoValue,
    concrete,
    elem_type,
    element,
    fmt_float,
    fmt_v,
    go_quote,
    indirect,
    map_of,
    seq_of,
    truth,
    type_name,
    type_of,
    zero,
)


def _basic(v: Any) -> tuple[str, Any]:
    """Go's basicKind: the comparison kind and the Python value."""
    kind, data = type_of(v).kind, (v.data if isinstance(v, GoValue) else v)
    return {"bool": "bool", "int": "int", "uint8": "uint", "float64": "float", "string": "string"}.get(
        kind, "invalid"), data


def _b_len(v: Any) -> int:
    if v is None:
        raise GoFuncError("reflect: call of reflect.Value.Type on zero Value")
    v, is_nil = indirect(v)
    if is_nil:
        raise GoFuncError("len of nil pointer")
    kind, data = _basic(v)
    if kind == "string":
        return len(data.encode("utf-8", "surrogateescape"))
    seq = seq_of(v) if seq_of(v) is not None else map_of(v)
    if seq is None:
        raise GoFuncError(f"len of type {type_name(v)}")
    return len(seq)


def _index_arg(index: Any, cap: int) -> int:
    if index is None:
        raise GoFuncError("cannot index slice/array with nil")
    kind, x = _basic(index)
    if kind not in ("int", "uint"):
        raise GoFuncError(f"cannot index slice/array with type {type_name(index)}")
    if not 0 <= x <= cap:
        raise GoFuncError(f"index out of range: {x}")
    return cast(int, x)


def _b_index(item: Any, *indexes: Any) -> Any:
    item = concrete(item)
    if item is None:
        raise GoFuncError("index of untyped nil")
    for index in indexes:
        index = concrete(index)
        item, is_nil = indirect(item)
        if is_nil:
            raise GoFuncError("index of nil pointer")
        seq = seq_of(item) if not isinstance(item, str) else list(item.encode("utf-8", "surrogateescape"))
        if seq is not None:
            x = _index_arg(index, len(seq))
            if x == len(seq):
                raise GoFuncError(f"reflect: {'string' if isinstance(item, str) else 'slice'} index out of range")
            item = GoValue(UINT8, seq[x]) if isinstance(item, str) else element(seq[x], elem_type(item))
        elif (mapping := map_of(item)) is not None:
            if index is None or not isinstance(index, str):
                raise GoFuncError("value is nil; should be of type string" if index is None else
                                  f"value has type {type_name(index)}; should be string")
            item = element(mapping[index], elem_type(item)) if index in mapping else zero(elem_type(item))
        else:
            raise GoFuncError(f"can't index item of type {type_name(item)}")
    return item


def _b_slice(item: Any, *indexes: Any) -> Any:
    item = concrete(item)
    if item is None:
        raise GoFuncError("slice of untyped nil")
    if len(indexes) > 3:
        raise GoFuncError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str) and len(indexes) == 3:
        raise GoFuncError("cannot 3-index slice a string")
    seq: Any = item.encode("utf-8", "surrogateescape") if isinstance(item, str) else seq_of(item)
    if seq is None:
        raise GoFuncError(f"can't slice item of type {type_name(item)}")
    bounds = [0, len(seq)]
    for i, index in enumerate(indexes):
        bounds[i:i + 1] = [_index_arg(index, len(seq))]
    for low, high in zip(bounds, bounds[1:], strict=False):
        if low > high:
            raise GoFuncError(f"invalid slice index: {low} > {high}")
    part = seq[bounds[0]:bounds[1]]
    if isinstance(item, str):
        return part.decode("utf-8", "surrogateescape")
    if isinstance(item, GoValue):
        return GoValue(item.type, part if item.data is not None else None)
    return part


def _is_nil(v: Any) -> bool:
    return v is None or (isinstance(v, GoValue) and v.type.kind in ("slice", "map", "ptr") and v.data is None)


def _comparable(t: GoType) -> bool:
    return t.kind not in ("slice", "map") and all(_comparable(ft) for _, ft, _ in t.fields)


def _eq_other(a: Any, b: Any) -> bool:
    """eq of values that are no basic kinds: nils, pointers and structs."""
    if a is not None and b is not None and type_of(a).kind != type_of(b).kind:
        raise GoFuncError(f"non-comparable types {fmt_v(a)}: {type_name(a)}, {type_name(b)}: {fmt_v(b)}")
    if _is_nil(a) or _is_nil(b):
        return _is_nil(a) == _is_nil(b)
    if not _comparable(type_of(b)):
        raise GoFuncError(f"non-comparable type {fmt_v(b)}: {type_name(b)}")
    return type_of(a) is type_of(b) and (a.data is b.data if type_of(a).kind == "ptr" else a.data == b.data)


def _b_eq(a: Any, *others: Any) -> bool:
    a = concrete(a)
    if not others:
        raise GoFuncError("missing argument for comparison")
    k1, x = _basic(a)
    for b in others:
        b = concrete(b)
        k2, y = _basic(b)
        if k1 != k2 and {k1, k2} != {"int", "uint"}:
            if a is not None and b is not None:
                raise GoFuncError(f"incompatible types for comparison: {type_name(a)} and {type_name(b)}")
            continue
        if (x == y) if k1 != "invalid" else _eq_other(a, b):
            return True
    return False


def _b_lt(a: Any, b: Any) -> bool:
    a, b = concrete(a), concrete(b)
    (k1, x), (k2, y) = _basic(a), _basic(b)
    if "invalid" in (k1, k2) or (k1 == k2 == "bool"):
        raise GoFuncError("invalid type for comparison")
    if k1 != k2 and {k1, k2} != {"int", "uint"}:
        raise GoFuncError(f"incompatible types for comparison: {type_name(a)} and {type_name(b)}")
    if k1 == "string":
        return bool(x.encode("utf-8", "surrogateescape") < y.encode("utf-8", "surrogateescape"))
    return bool(x < y)


def _b_le(a: Any, b: Any) -> bool:
    return _b_lt(a, b) or _b_eq(a, b)


def _is_string(v: Any) -> bool:
    return type_of(v).kind == "string"


def _sprint(*args: Any) -> str:
    """fmt.Sprint: a space between operands when neither is a string."""
    out = []
    for i, arg in enumerate(args):
        if i and not _is_string(arg) and not _is_string(args[i - 1]):
            out.append(" ")
        out.append(fmt_v(arg))
    return "".join(out)


def _eval_args(*args: Any) -> str:
    """text/template's evalArgs: a lone string as is, else fmt.Sprint of the (dereferenced) arguments."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return _sprint(*(a.data if isinstance(a, GoValue) and a.type.kind == "ptr" and a.data else a for a in args))


_HTML = {"\0": "\ufffd", '"': "&#34;", "'": "&#39;", "&": "&amp;", "<": "&lt;", ">": "&gt;"}
_JS = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026", "=": "\\u003D"}


def _b_js(*args: Any) -> str:
    """JSEscapeString of the arguments."""
    out = []
    for ch in _eval_args(*args):
        if ch in _JS:
            out.append(_JS[ch])
        elif ch < " ":
            out.append(f"\\u00{ord(ch):02X}")
        elif ch >= "\x80" and not ch.isprintable():
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out)


def _b_call(name: str, fn: Any, *_: Any) -> Any:
    """call: template data here holds no functions, so only its errors remain."""
    fn = concrete(fn)
    raise GoFuncError("call of nil" if fn is None else f"non-function {name} of type {type_name(fn)}")


BUILTINS: dict[str, GoFunc] = {
    "and": GoFunc(lambda *a: None, ("value",), "value"), "or": GoFunc(lambda *a: None, ("value",), "value"),
    "not": GoFunc(lambda v: not truth(v), ("value",)), "len": GoFunc(_b_len, ("value",)),
    "index": GoFunc(_b_index, ("value",), "value"), "slice": GoFunc(_b_slice, ("value",), "value"),
    "eq": GoFunc(_b_eq, ("value",), "value"), "ne": GoFunc(lambda a, b: not _b_eq(a, b), ("value", "value")),
    "lt": GoFunc(_b_lt, ("value", "value")), "le": GoFunc(_b_le, ("value", "value")),
    "gt": GoFunc(lambda a, b: not _b_le(a, b), ("value", "value")),
    "ge": GoFunc(lambda a, b: not _b_lt(a, b), ("value", "value")),
    "print": GoFunc(_sprint, (), "any"), "println": GoFunc(lambda *a: " ".join(map(fmt_v, a)) + "\n", (), "any"),
    "printf": GoFunc(lambda f, *a: sprintf(f, *a), ("string",), "any"), "call": GoFunc(_b_call, ("value",), "value"),
    "html": GoFunc(lambda *a: "".join(_HTML.get(c, c) for c in _eval_args(*a)), (), "any"),
    "js": GoFunc(_b_js, (), "any"),
    "urlquery": GoFunc(lambda *a: urllib.parse.quote_plus(_eval_args(*a).encode("utf-8", "surrogateescape")), (),
                       "any"),
}


def _verb(arg: Any, verb: str, flags: str, prec: int | None) -> str | None:
    """One printf verb applied to one operand; None when the verb does not fit the operand."""
    kind, data = _basic(arg)
    if verb == "v" or (verb == "s" and (kind == "string" or type_of(arg).string or kind == "invalid")):
        text = fmt_v(arg) if arg is not None or verb == "v" else None
        return text if prec is None or text is None else text[:prec]
    if verb == "T":
        return "<nil>" if arg is None else type_name(arg)
    if verb == "q" and kind == "string":
        return go_quote(data)
    if verb == "t" and kind == "bool":
        return fmt_v(data)
    if kind in ("int", "uint") and verb in "dxXoc":
        text = chr(data) if verb == "c" else format(data, verb)
        return ("+" if "+" in flags and data >= 0 and verb == "d" else "") + text
    if kind == "string" and verb in "xX":
        hexed: str = data.encode("utf-8", "surrogateescape").hex()
        return hexed.upper() if verb == "X" else hexed
    if kind == "float" and verb in "eEfFgG":
        if verb in "gG" and prec is None:
            text = fmt_float(data)
            return text.upper() if verb == "G" else text
        return format(data, f"{'+' if '+' in flags else ''}.{6 if prec is None else prec}{verb}")
    return None


_SPEC = re.compile(r"([-+# 0]*)(\d*)(?:\.(\d*))?(.?)", re.DOTALL)


def _pad(text: str, verb: str, flags: str, width: int) -> str:
    """A formatted operand padded to width: left-justified with -, zeros after the sign with 0 (numbers)."""
    pad = max(0, width - len(text))
    if "-" in flags:
        return text + " " * pad
    if "0" in flags and verb in "dxXoeEfFgG":
        sign = text[:1] if text[:1] in "+-" else ""
        return sign + "0" * pad + text[len(sign):]
    return " " * pad + text


def sprintf(fmt: str, *args: Any) -> str:
    """fmt.Sprintf for the verbs v s q t T d o x X c e f g (flags - + 0, width, precision); an operand a verb
    does not fit prints as Go's %!verb(type=value), and missing and extra operands as Go marks them."""
    out, used, i = [], 0, 0
    while (j := fmt.find("%", i)) >= 0:
        out.append(fmt[i:j])
        spec = _SPEC.match(fmt, j + 1)
        assert spec is not None  # every part is optional
        flags, width, prec, verb = spec.group(1), int(spec.group(2) or 0), spec.group(3), spec.group(4)
        i = spec.end()
        if verb in ("%", ""):
            out.append("%" if verb else "%!(NOVERB)")
        elif used >= len(args):
            out.append(f"%!{verb}(MISSING)")
        else:
            arg, used = args[used], used + 1
            text = _verb(arg, verb, flags, None if prec is None else int(prec or 0))
            if text is None:
                text = f"%!{verb}(<nil>)" if arg is None else f"%!{verb}({type_name(arg)}={fmt_v(arg)})"
            out.append(_pad(text, verb, flags, width))
    out.append(fmt[i:])
    if used < len(args):
        extra = ", ".join("<nil>" if a is None else f"{type_name(a)}={fmt_v(a)}" for a in args[used:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)
