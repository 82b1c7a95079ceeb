"""Ollama's Modelfile syntax: quoting that survives Ollama's parser, and a parser that behaves like it.

Ollama reads a value rune by rune and ends it at the first newline after which the text so
far (trimmed) is balanced: bare text, "...", or \"\"\"...\"\"\"; runes Go does not call printable
(strconv.IsPrint) are dropped on the way. There are no escapes, so some
strings (one with a \"\"\" right before a line break, say) cannot be written at all. Instead of trusting a
quoting rule, `quote` tries the candidate forms and keeps the first one that this parser,
which mirrors Ollama's state machine, reads back unchanged.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires"}
MESSAGE_ROLES = {"system", "user", "assistant"}


class ModelfileSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Command:
    name: str  # "model" for FROM, the parameter's own name for PARAMETER, else the lowercase instruction
    args: str


def _unquote(text: str) -> tuple[str, bool]:
    if text.startswith('"""'):
        return (text[3:-3], True) if len(text) >= 6 and text.endswith('"""') else ("", False)
    if text.startswith('"'):
        return (text[1:-1], True) if len(text) >= 2 and text.endswith('"') else ("", False)
    return text, True


def is_go_printable(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _read_value(text: str, i: int) -> tuple[str, int]:
    """Read a value starting at text[i]; return it and the index after it.

    Like Ollama, a line break ends the value only once the text so far is balanced, and a rune
    that Go does not call printable is dropped (spaces, tabs and line breaks inside are kept).
    """
    kept: list[str] = []
    while i < len(text):
        ch = text[i]
        if ch in "\r\n":
            value, ok = _unquote("".join(kept).strip())
            if ok:
                return value, i
            kept.append(ch)
        elif ch in " \t" or is_go_printable(ch):
            kept.append(ch)
        i += 1
    value, ok = _unquote("".join(kept).strip())
    if not ok:
        raise ModelfileSyntaxError("unterminated quoted value")
    return value, i


def _read_word(text: str, i: int, allowed: Callable[[str], bool]) -> tuple[str, int]:
    start = i
    while i < len(text) and allowed(text[i]):
        i += 1
    if i == len(text) or text[i] not in " \t":
        raise ModelfileSyntaxError(f"expected a space after {text[start:i]!r}")
    while i < len(text) and text[i] in " \t":  # Ollama skips the run of spaces before a value
        i += 1
    return text[start:i].strip(), i


def parse_modelfile(text: str) -> list[Command]:
    commands, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == "#":
            while i < len(text) and text[i] not in "\r\n":
                i += 1
        else:
            word, i = _read_word(text, i, str.isalpha)
            name = word.lower()
            if name not in COMMANDS:
                raise ModelfileSyntaxError(f"unknown instruction {word!r}")
            prefix = ""
            if name == "parameter":
                name, i = _read_word(text, i, lambda c: c.isalnum() or c == "_")
            elif name == "message":
                role, i = _read_word(text, i, str.isalpha)
                if role not in MESSAGE_ROLES:
                    raise ModelfileSyntaxError(f"invalid message role {role!r}")
                prefix = f"{role}: "
            value, i = _read_value(text, i)
            commands.append(Command("model" if name == "from" else name, prefix + value))
    if not any(c.name == "model" for c in commands):
        raise ModelfileSyntaxError("no FROM line")
    return commands


def quote(value: object) -> str:
    """Render a value so that Ollama's parser reads back exactly `value`, or raise ModelfileSyntaxError."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    dropped = next((ch for ch in text if ch not in " \t\r\n" and not is_go_printable(ch)), None)
    if dropped is not None:
        name = unicodedata.name(dropped, "a control character")
        raise ModelfileSyntaxError(f"contains U+{ord(dropped):04X} ({name}), which Ollama's Modelfile parser "
                                   "drops: `ollama create -f` would store a different text than the API")
    for candidate in (text, f'"""{text}"""', f'"{text}"'):
        try:
            parsed = parse_modelfile(f"FROM x\nSYSTEM {candidate}\n")
        except ModelfileSyntaxError:
            continue
        if len(parsed) == 2 and parsed[1].args == text:
            return candidate
    raise ModelfileSyntaxError(f"{text[:40]!r}... cannot be written in a Modelfile: it contains a quote "
                               "sequence that Ollama's parser would end the value at")
