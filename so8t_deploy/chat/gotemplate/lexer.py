"""Go's text/template lexer (text/template/parse/lex.go) as one pass, and strconv's unquoting."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .values import fmt_rune, go_quote


@dataclass(frozen=True)
class Item:
    typ: str
    pos: int
    val: str
    line: int

    def __str__(self) -> str:
        if self.typ in ("eof", "error"):
            return "EOF" if self.typ == "eof" else self.val
        if self.typ in _KEYWORDS.values():
            return f"<{self.val}>"
        return go_quote(self.val[:10]) + "..." if len(self.val.encode()) > 10 else go_quote(self.val)


_KEYWORDS = {".": "dot", "block": "block", "break": "break", "continue": "continue", "define": "define",
             "else": "else", "end": "end", "if": "if", "range": "range", "nil": "nil", "template": "template",
             "with": "with"}
_SPACE = " \t\r\n"
_TERMINATORS = set(_SPACE) | set(".,|:)(")


def _left_trim(s: str, i: int) -> bool:
    """Go's hasLeftTrimMarker: "-" and an ASCII space."""
    return s[i:i + 1] == "-" and s[i + 1:i + 2] != "" and s[i + 1] in _SPACE


def _alnum(ch: str) -> bool:
    return ch == "_" or ch.isalpha() or unicodedata.category(ch) == "Nd"


class Lexer:
    """Go's lexer as one pass; items end with an eof or an error item."""

    def __init__(self, text: str) -> None:
        self.s, self.pos, self.start, self.paren = text, 0, 0, 0
        self.items: list[Item] = []

    def emit(self, typ: str) -> None:
        self.items.append(Item(typ, self.start, self.s[self.start:self.pos], 1 + self.s.count("\n", 0, self.start)))
        self.start = self.pos

    def error(self, message: str) -> Callable[[], Any] | None:
        """An error item ends the scan."""
        self.items.append(Item("error", self.start, message, 1 + self.s.count("\n", 0, self.start)))
        return None

    def peek(self) -> str:
        return self.s[self.pos] if self.pos < len(self.s) else ""

    def accept(self, valid: str) -> bool:
        if self.peek() and self.peek() in valid:
            self.pos += 1
            return True
        return False

    def accept_run(self, valid: str) -> None:
        while self.accept(valid):
            pass

    def right_delim(self) -> tuple[bool, bool]:
        """(at a right delimiter, with a trim marker)."""
        if self.s[self.pos:self.pos + 2] in (" -", "\t-", "\r-", "\n-") and self.s.startswith("}}", self.pos + 2):
            return True, True
        return self.s.startswith("}}", self.pos), False

    def at_terminator(self) -> bool:
        return self.peek() in _TERMINATORS or not self.peek() or self.s.startswith("}}", self.pos)

    def run(self) -> list[Item]:
        state: Callable[[], Any] | None = self.text
        while state is not None:
            state = state()
        return self.items

    def text(self) -> Callable[[], Any] | None:
        x = self.s.find("{{", self.pos)
        end = len(self.s) if x < 0 else x
        if x >= 0 and _left_trim(self.s, x + 2):
            end = self.start + len(self.s[self.start:x].rstrip(_SPACE))
        if end > self.start:
            self.pos = end
            self.emit("text")
        if x < 0:
            self.emit("eof")
            return None
        self.pos = self.start = x
        return self.left_delim

    def left_delim(self) -> Callable[[], Any] | None:
        self.pos += 2
        marker = 2 if _left_trim(self.s, self.pos) else 0
        if self.s.startswith("/*", self.pos + marker):
            self.pos = self.start = self.pos + marker
            return self.comment
        self.emit("leftdelim")
        self.pos = self.start = self.pos + marker
        self.paren = 0
        return self.inside

    def comment(self) -> Callable[[], Any] | None:
        i = self.s.find("*/", self.pos + 2)
        if i < 0:
            return self.error("unclosed comment")
        self.pos = i + 2
        delim, trim = self.right_delim()
        if not delim:
            return self.error("comment ends before closing delimiter")
        self.pos += 4 if trim else 2
        if trim:
            self.pos = len(self.s) - len(self.s[self.pos:].lstrip(_SPACE))
        self.start = self.pos
        return self.text

    def close(self) -> Callable[[], Any] | None:
        trim = self.right_delim()[1]
        if trim:
            self.pos = self.start = self.pos + 2
        self.pos += 2
        self.emit("rightdelim")
        if trim:
            self.pos = self.start = len(self.s) - len(self.s[self.pos:].lstrip(_SPACE))
        return self.text

    def inside(self) -> Callable[[], Any] | None:  # noqa: C901 - one branch per token, as Go's
        if self.right_delim()[0]:
            return self.close if self.paren == 0 else self.error("unclosed left paren")
        r = self.peek()
        self.pos += 1
        if not r:
            return self.error("unclosed action")
        if r in _SPACE:
            self.pos -= 1
            return self.space
        simple = {"=": "assign", "|": "pipe", "(": "leftparen", ")": "rightparen"}
        if r in simple:
            self.emit(simple[r])
            self.paren += {"(": 1, ")": -1}.get(r, 0)
            return self.error(f"unexpected right paren {fmt_rune(r)}") if self.paren < 0 else self.inside
        if r == ":":
            self.pos += 1
            if self.s[self.pos - 1:self.pos] != "=":
                return self.error("expected :=")
            self.emit("declare")
            return self.inside
        if r in "\"`'":
            return self.quote(r)
        if r == "$":
            return self.variable()
        if r == "." and self.pos < len(self.s) and not "0" <= self.s[self.pos] <= "9":
            return self.field_or_variable("field")
        if r in "+-." or "0" <= r <= "9":
            self.pos -= 1
            return self.number()
        if _alnum(r):
            self.pos -= 1
            return self.identifier()
        if ord(r) < 0x80 and r.isprintable():
            self.emit("char")
            return self.inside
        return self.error(f"unrecognized character in action: {fmt_rune(r)}")

    def space(self) -> Callable[[], Any] | None:
        count = len(self.s[self.pos:]) - len(self.s[self.pos:].lstrip(_SPACE))
        self.pos += count
        if self.s[self.pos:self.pos + 1] == "-" and self.s.startswith("}}", self.pos + 1):
            self.pos -= 1
            if count == 1:
                return self.close
        self.emit("space")
        return self.inside

    def identifier(self) -> Callable[[], Any] | None:
        while self.peek() and _alnum(self.peek()):
            self.pos += 1
        if not self.at_terminator():
            return self.error(f"bad character {fmt_rune(self.peek())}")
        word = self.s[self.start:self.pos]
        self.emit(_KEYWORDS.get(word) or ("bool" if word in ("true", "false") else "identifier"))
        return self.inside

    def variable(self) -> Callable[[], Any] | None:
        if self.at_terminator():
            self.emit("variable")
            return self.inside
        return self.field_or_variable("variable")

    def field_or_variable(self, typ: str) -> Callable[[], Any] | None:
        if self.at_terminator():
            self.emit("variable" if typ == "variable" else "dot")
            return self.inside
        while self.peek() and _alnum(self.peek()):
            self.pos += 1
        if not self.at_terminator():
            return self.error(f"bad character {fmt_rune(self.peek())}")
        self.emit(typ)
        return self.inside

    def quote(self, q: str) -> Callable[[], Any] | None:
        what = {'"': "quoted string", "'": "character constant", "`": "raw quoted string"}[q]
        while True:
            r = self.peek()
            self.pos += 1
            if r == "\\" and q != "`":
                r = self.peek()
                self.pos += 1
                if r and r != "\n":
                    continue
            if not r or (r == "\n" and q != "`"):
                return self.error(f"unterminated {what}")
            if r == q:
                break
        self.emit({'"': "string", "'": "charconst", "`": "rawstring"}[q])
        return self.inside

    def number(self) -> Callable[[], Any] | None:
        if not self.scan_number():
            return self.error(f"bad number syntax: {go_quote(self.s[self.start:self.pos])}")
        if self.peek() and self.peek() in "+-":
            if not self.scan_number() or self.s[self.pos - 1] != "i":
                return self.error(f"bad number syntax: {go_quote(self.s[self.start:self.pos])}")
            self.emit("complex")
        else:
            self.emit("number")
        return self.inside

    def scan_number(self) -> bool:
        self.accept("+-")
        digits = "0123456789_"
        if self.accept("0"):
            for prefix, run in (("xX", "0123456789abcdefABCDEF_"), ("oO", "01234567_"), ("bB", "01_")):
                if self.accept(prefix):
                    digits = run
                    break
        self.accept_run(digits)
        if self.accept("."):
            self.accept_run(digits)
        if (len(digits) == 11 and self.accept("eE")) or (len(digits) == 23 and self.accept("pP")):
            self.accept("+-")
            self.accept_run("0123456789_")
        self.accept("i")
        if self.peek() and _alnum(self.peek()):
            self.pos += 1
            return False
        return True


_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
_HEX = "0123456789abcdefABCDEF"


def unquote_char(s: str, i: int, quote: str) -> tuple[int, bool, int]:
    """strconv.UnquoteChar: (code, whether it is a raw byte, next index); ValueError on bad syntax."""
    c = s[i]
    if c == quote:
        raise ValueError("invalid syntax")
    if c != "\\":
        return ord(c), False, i + 1
    c, i = s[i + 1:i + 2], i + 2
    if c in _SIMPLE_ESCAPES and c:
        return _SIMPLE_ESCAPES[c], False, i
    if c and c in "xuU":
        digits = s[i:i + {"x": 2, "u": 4, "U": 8}[c]]
        if len(digits) != {"x": 2, "u": 4, "U": 8}[c] or any(d not in _HEX for d in digits):
            raise ValueError("invalid syntax")
        code = int(digits, 16)
        if c != "x" and (code > 0x10FFFF or 0xD800 <= code < 0xE000):
            raise ValueError("invalid syntax")
        return code, c == "x", i + len(digits)
    if c and c in "01234567":
        digits = s[i - 1:i + 2]
        if len(digits) != 3 or any(d not in "01234567" for d in digits) or int(digits, 8) > 255:
            raise ValueError("invalid syntax")
        return int(digits, 8), True, i + 2
    if c and c in "'\"" and c == quote:
        return ord(c), False, i
    raise ValueError("invalid syntax")


def unquote(token: str) -> str:
    """strconv.Unquote of a string token (raw strings lose their carriage returns, as Go's do)."""
    if token[0] == "`":
        return token[1:-1].replace("\r", "")
    body, out, i = token[1:-1], bytearray(), 0
    while i < len(body):
        code, raw, i = unquote_char(body, i, '"')
        out += bytes([code]) if raw else chr(code).encode()
    return out.decode("utf-8", "surrogateescape")
