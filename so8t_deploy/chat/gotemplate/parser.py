"""Go's text/template parser (text/template/parse/parse.go), with its three-token lookahead and messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from .lexer import Item, Lexer, unquote, unquote_char
from .nodes import (
    ActionNode,
    BranchNode,
    ChainNode,
    CommandNode,
    ControlNode,
    FieldNode,
    IdentifierNode,
    ListNode,
    LiteralNode,
    Node,
    PipeNode,
    TextNode,
    VariableNode,
    node_str,
)
from .values import GoTemplateError, go_quote


def _parse_int(text: str) -> int | None:
    """strconv.ParseInt with base 0, without its range check: None when text is no integer literal."""
    sign = text[:1] if text[:1] in "+-" else ""
    body = text[len(sign):]
    if len(body) > 1 and body[0] == "0" and body[1] in "01234567_":
        body = "0o" + body[1:]
    try:
        value = int(body, 0) if body[:1] not in "+-" else None
    except ValueError:
        return None
    return None if value is None else -value if sign == "-" else value


def _parse_float(text: str) -> float | None:
    """strconv.ParseFloat: decimal, or hexadecimal with a p exponent."""
    body = text.lstrip("+-")
    try:
        if body[:2] in ("0x", "0X"):
            value = float.fromhex(body.replace("_", "")) if "p" in body.lower() else None
        else:
            value = float(body)
    except ValueError:
        return None
    return None if value is None else -value if text.startswith("-") else value


def _number(text: str, typ: str) -> Any:
    """parse.newNumber and exec's idealConstant: the constant's value (an int or a float), None for one only a
    uint64 holds (it overflows int when used). ValueError with Go's message on bad syntax."""
    if typ == "charconst":
        code, _, end = unquote_char(text[1:], 0, "'")
        if text[1 + end:] != "'":
            raise ValueError(f"malformed character constant: {text}")
        return code
    if typ == "complex" or text.endswith("i"):
        raise ValueError(f"complex constants are not supported: {text}")
    integer = _parse_int(text)
    if integer is None or not -(1 << 63) <= integer < (1 << 64):
        value = _parse_float(text)
        if value is None:
            raise ValueError(f"illegal number syntax: {go_quote(text)}")
        if not any(c in text for c in ".eEpP"):
            raise ValueError(f"integer overflow: {go_quote(text)}")
        return value
    hex_int = text[:2] in ("0x", "0X") and not any(c in text for c in "pP")
    if not hex_int and any(c in text for c in ".eEpP"):
        return float(integer)
    return integer if integer < (1 << 63) else None


_OPERAND_START = {"bool", "charconst", "complex", "dot", "field", "identifier", "number", "nil", "rawstring",
                  "string", "variable", "leftparen"}


class Parser:
    """Go's parse.Tree for one template, with its three-token lookahead (error lines depend on it)."""

    def __init__(self, text: str, name: str, funcs: Mapping[str, Any]) -> None:
        self.items, self.i, self.name, self.funcs = Lexer(text).run(), 0, name, funcs
        self.token: list[Item] = [self.items[0]] * 3
        self.peek_count, self.action_line, self.range_depth = 0, 0, 0
        self.vars = ["$"]

    def _lexed(self) -> Item:
        item = self.items[min(self.i, len(self.items) - 1)]
        self.i += 1
        return item

    def next(self) -> Item:
        if self.peek_count > 0:
            self.peek_count -= 1
        else:
            self.token[0] = self._lexed()
        return self.token[self.peek_count]

    def backup(self, *items: Item) -> None:
        """Go's backup (no items), backup2 (one) and backup3 (two, last pushed first)."""
        for slot, item in enumerate(reversed(items), start=1):
            self.token[slot] = item
        self.peek_count = len(items) + 1 if items else self.peek_count + 1

    def peek(self) -> Item:
        if self.peek_count > 0:
            return self.token[self.peek_count - 1]
        self.peek_count, self.token[0] = 1, self._lexed()
        return self.token[0]

    def next_non_space(self) -> Item:
        token = self.next()
        while token.typ == "space":
            token = self.next()
        return token

    def peek_non_space(self) -> Item:
        token = self.next_non_space()
        self.backup()
        return token

    def errorf(self, message: str) -> NoReturn:
        raise GoTemplateError(f"template: {self.name}:{self.token[0].line}: {message}")

    def expect(self, typ: str, context: str) -> Item:
        token = self.next_non_space()
        if token.typ != typ:
            self.unexpected(token, context)
        return token

    def unexpected(self, token: Item, context: str) -> NoReturn:
        if token.typ == "error":
            extra = ""
            if self.action_line not in (0, token.line):
                extra = f" in action started at {self.name}:{self.action_line}"
                extra = extra[len(" in action"):] if token.val.endswith(" action") else extra
            self.errorf(token.val + extra)
        self.errorf(f"unexpected {token} in {context}")

    def parse(self) -> ListNode:
        root = ListNode(self.peek().pos)
        while self.peek().typ != "eof":
            if self.peek().typ == "leftdelim":
                delim = self.next()
                if self.next_non_space().typ == "define":
                    self.errorf("{{define}} is not supported by this implementation")
                self.backup(delim)
            node = self.text_or_action()
            if isinstance(node, ControlNode) and node.keyword in ("end", "else"):
                self.errorf(f"unexpected {node_str(node)}")
            root.nodes.append(node)
        return root

    def item_list(self) -> tuple[ListNode, ControlNode]:
        items = ListNode(self.peek_non_space().pos)
        while self.peek_non_space().typ != "eof":
            node = self.text_or_action()
            if isinstance(node, ControlNode) and node.keyword in ("end", "else"):
                return items, node
            items.nodes.append(node)
        self.errorf("unexpected EOF")

    def text_or_action(self) -> Node:
        token = self.next_non_space()
        if token.typ == "text":
            return TextNode(token.pos, token.val)
        if token.typ != "leftdelim":
            self.unexpected(token, "input")
        self.action_line = token.line
        try:
            return self.action()
        finally:
            self.action_line = 0

    def action(self) -> Node:
        token = self.next_non_space()
        if token.typ in ("block", "template"):
            self.errorf(f"{{{{{token.typ}}}}} is not supported by this implementation")
        if token.typ in ("break", "continue"):
            after = self.next_non_space()
            if after.typ != "rightdelim":
                self.unexpected(after, f"{{{{{token.typ}}}}}")
            if self.range_depth == 0:
                self.errorf(f"{{{{{token.typ}}}}} outside {{{{range}}}}")
            return ControlNode(token.pos, token.typ)
        if token.typ == "else":
            peek = self.peek_non_space()
            if peek.typ in ("if", "with"):
                return ControlNode(peek.pos, "else")
            return ControlNode(self.expect("rightdelim", "else").pos, "else")
        if token.typ == "end":
            return ControlNode(self.expect("rightdelim", "end").pos, "end")
        if token.typ in ("if", "range", "with"):
            return self.control(token.typ)
        self.backup()
        return ActionNode(self.peek().pos, self.pipeline("command", "rightdelim"))

    def control(self, context: str) -> BranchNode:
        saved = len(self.vars)
        try:
            pipe = self.pipeline(context, "rightdelim")
            self.range_depth += context == "range"
            body, end = self.item_list()
            self.range_depth -= context == "range"
            else_list = None
            if end.keyword == "else":
                if context in ("if", "with") and self.peek().typ == context:  # else if, else with (Go 1.23)
                    self.next()
                    else_list = ListNode(end.pos, [self.control(context)])
                else:
                    else_list, end = self.item_list()
                    if end.keyword != "end":
                        self.errorf(f"expected end; found {node_str(end)}")
            return BranchNode(pipe.pos, context, pipe, body, else_list)
        finally:
            del self.vars[saved:]

    def pipeline(self, context: str, end: str) -> PipeNode:
        token = self.peek_non_space()
        pipe = PipeNode(token.pos, token.line)
        self.declarations(pipe, context)
        while True:
            token = self.next_non_space()
            if token.typ == end:
                self.check_pipeline(pipe, context)
                return pipe
            if token.typ not in _OPERAND_START:
                self.unexpected(token, context)
            self.backup()
            pipe.cmds.append(self.command())

    def declarations(self, pipe: PipeNode, context: str) -> None:
        while (v := self.peek_non_space()).typ == "variable":
            self.next()
            after, following = self.peek(), self.peek_non_space()
            if following.typ in ("assign", "declare") or (following.typ == "char" and following.val == ","):
                self.next_non_space()
                pipe.is_assign = following.typ == "assign"
                pipe.decl.append(VariableNode(v.pos, v.val.split(".")))
                self.vars.append(v.val)
                if following.typ != "char":
                    return
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space().typ in ("variable", "rightdelim", "rightparen"):
                        continue
                    self.errorf("range can only initialize variables")
                self.errorf(f"too many declarations in {context}")
            self.backup(v, after) if after.typ == "space" else self.backup(v)
            return

    def check_pipeline(self, pipe: PipeNode, context: str) -> None:
        if not pipe.cmds:
            self.errorf(f"missing value for {context}")
        for stage, cmd in enumerate(pipe.cmds[1:], start=2):
            if isinstance(cmd.args[0], LiteralNode):
                self.errorf(f"non executable command in pipeline stage {stage}")

    def command(self) -> CommandNode:
        cmd = CommandNode(self.peek_non_space().pos)
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            token = self.next()
            if token.typ == "space":
                continue
            if token.typ in ("rightdelim", "rightparen"):
                self.backup()
            elif token.typ != "pipe":
                self.unexpected(token, "operand")
            break
        if not cmd.args:
            self.errorf("empty command")
        return cmd

    def operand(self) -> Node | None:
        node = self.term()
        if node is None or self.peek().typ != "field":
            return node
        chain = ChainNode(self.peek().pos, node, [])
        while self.peek().typ == "field":
            chain.fields.append(self.next().val[1:])
        if isinstance(node, FieldNode):
            return FieldNode(chain.pos, node_str(chain)[1:].split("."))
        if isinstance(node, VariableNode):
            return VariableNode(chain.pos, node_str(chain).split("."))
        if isinstance(node, LiteralNode):
            self.errorf(f"unexpected . after term {go_quote(node_str(node))}")
        return chain

    def term(self) -> Node | None:  # noqa: C901 - one branch per token, as Go's
        token = self.next_non_space()
        typ, pos, val = token.typ, token.pos, token.val
        if typ == "identifier":
            if val not in self.funcs:
                self.errorf(f"function {go_quote(val)} not defined")
            return IdentifierNode(pos, val)
        if typ in ("dot", "nil", "bool"):
            return LiteralNode(pos, typ, val, {"dot": None, "nil": None, "bool": val == "true"}[typ])
        if typ == "variable":
            if val.split(".")[0] not in self.vars:
                self.errorf(f"undefined variable {go_quote(val.split('.')[0])}")
            return VariableNode(pos, val.split("."))
        if typ == "field":
            return FieldNode(pos, val[1:].split("."))
        if typ in ("charconst", "complex", "number", "string", "rawstring"):
            try:
                if typ in ("string", "rawstring"):
                    return LiteralNode(pos, "string", val, unquote(val))
                return LiteralNode(pos, "number", val, _number(val, typ))
            except ValueError as e:
                self.errorf(str(e))
        if typ == "leftparen":
            return self.pipeline("parenthesized pipeline", "rightparen")
        self.backup()
        return None
