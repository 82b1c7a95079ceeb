"""Go's text/template executor (exec.go): the walk, pipelines, fields, calls, and GoTemplate."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, cast

from .funcs import BUILTINS
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
from .parser import Parser
from .values import (
    ANY,
    MISSING,
    NIL,
    GoFunc,
    GoFuncError,
    GoTemplateError,
    GoValue,
    Iface,
    concrete,
    elem_type,
    element,
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


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Exec:
    """One execution (Go's exec.state): the output, the variable stack and the node errors point at."""

    def __init__(self, tmpl: GoTemplate, funcs: Mapping[str, GoFunc], missingkey: str) -> None:
        self.tmpl, self.funcs, self.missingkey = tmpl, funcs, missingkey
        self.out: list[str] = []
        self.vars: list[list[Any]] = []
        self.node: Node | None = None

    def fail(self, message: str) -> NoReturn:
        name, text = self.tmpl.name, self.tmpl.text
        if self.node is None:
            raise GoTemplateError(f"template: {name}: {message}")
        pos = self.node.pos
        start = text.rfind("\n", 0, pos) + 1
        column = len(text[start:pos].encode("utf-8", "surrogateescape"))
        where = f"{name}:{1 + text.count(chr(10), 0, pos)}:{column}"
        raise GoTemplateError(f"template: {where}: executing {go_quote(name)} at <{node_str(self.node)}>: {message}")

    def var(self, name: str) -> list[Any]:
        for slot in reversed(self.vars):
            if slot[0] == name:
                return cast(list[Any], slot)
        self.fail(f"undefined variable: {name}")

    def walk(self, dot: Any, node: Node) -> None:
        self.node = node
        if isinstance(node, ActionNode):
            value = self.pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.node = node
                value = value.data if isinstance(value, GoValue) and value.type.kind == "ptr" and value.data else value
                self.out.append("<no value>" if value is None else fmt_v(value))
        elif isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, TextNode):
            self.out.append(node.text)
        elif isinstance(node, BranchNode):
            self.walk_range(dot, node) if node.keyword == "range" else self.walk_if(dot, node)
        elif isinstance(node, ControlNode):
            raise _Break() if node.keyword == "break" else _Continue()

    def walk_if(self, dot: Any, node: BranchNode) -> None:
        mark = len(self.vars)
        try:
            value = self.pipeline(dot, node.pipe)
            if truth(value):
                self.walk(value if node.keyword == "with" else dot, node.list)
            elif node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            del self.vars[mark:]

    def walk_range(self, dot: Any, node: BranchNode) -> None:
        mark = len(self.vars)
        try:
            value, _ = indirect(self.pipeline(dot, node.pipe))
            inner = len(self.vars)
            items = self.range_items(value, node)
            for index, elem in items:
                self.iteration(node, inner, index, elem)
            if not items and node.else_list is not None:
                self.walk(dot, node.else_list)
        except _Break:
            pass
        finally:
            del self.vars[mark:]

    def range_items(self, value: Any, node: BranchNode) -> list[tuple[Any, Any]]:
        if (seq := seq_of(value)) is not None:
            return [(i, element(x, elem_type(value))) for i, x in enumerate(seq)]
        if (mapping := map_of(value)) is not None:
            return [(k, element(mapping[k], elem_type(value))) for k in sorted(mapping)]
        if isinstance(value, int) and not isinstance(value, bool):  # Go >= 1.22
            if len(node.pipe.decl) > 1:
                self.fail(f"can't use {value} to iterate over more than one variable")
            return [(i, i) for i in range(value)]
        if value is not None:
            self.fail(f"range can't iterate over {fmt_v(value)}")
        return []

    def iteration(self, node: BranchNode, mark: int, index: Any, elem: Any) -> None:
        decl = node.pipe.decl
        if node.pipe.is_assign:  # Go >= 1.21: {{range $i, $x = ...}} assigns the outer variables
            self.var(decl[0].ident[0])[1] = index if len(decl) > 1 else elem
            if len(decl) > 1:
                self.var(decl[1].ident[0])[1] = elem
        elif decl:
            self.vars[-1][1] = elem
            if len(decl) > 1:
                self.vars[-2][1] = index
        try:
            self.walk(elem, node.list)
        except _Continue:
            pass
        finally:
            del self.vars[mark:]

    def pipeline(self, dot: Any, pipe: PipeNode) -> Any:
        self.node = pipe
        value = MISSING
        for cmd in pipe.cmds:
            value = self.command(dot, cmd, value)
            value = concrete(value)
        for variable in pipe.decl:
            if pipe.is_assign:
                self.var(variable.ident[0])[1] = value
            else:
                self.vars.append([variable.ident[0], value])
        return value

    def command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        first = cmd.args[0]
        if isinstance(first, (FieldNode, ChainNode, VariableNode)):
            return self.chain(dot, first, cmd.args, final)
        if isinstance(first, IdentifierNode):
            return self.function(dot, first, cmd, cmd.args, final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.pipeline(dot, first)
        self.node = first
        self.not_a_function(cmd.args, final)
        assert isinstance(first, LiteralNode)
        if first.kind == "nil":
            self.fail("nil is not a command")
        return dot if first.kind == "dot" else self.constant(first)

    def constant(self, node: LiteralNode) -> Any:
        self.node = node
        if node.kind == "number" and node.value is None:
            self.fail(f"{node.text} overflows int")
        return node.value

    def not_a_function(self, args: list[Node], final: Any) -> None:
        if len(args) > 1 or final is not MISSING:
            self.fail(f"can't give argument to non-function {node_str(args[0])}")

    def chain(self, dot: Any, node: Node, args: list[Node] | None, final: Any) -> Any:
        """A field (.A.B), variable ($x.A) or chain ((pipeline).A) with its arguments."""
        self.node = node
        if isinstance(node, FieldNode):
            receiver, names = dot, node.ident
        elif isinstance(node, VariableNode):
            receiver, names = self.var(node.ident[0])[1], node.ident[1:]
            if not names:
                self.not_a_function(args or [], final)
                return receiver
        else:
            assert isinstance(node, ChainNode)
            receiver, names = self.arg(dot, None, node.node), node.fields
        for name in names[:-1]:
            receiver = self.field(dot, name, node, None, MISSING, receiver)
        return self.field(dot, names[-1], node, args, final, receiver)

    def field(self, dot: Any, name: str, node: Node, args: list[Node] | None, final: Any, receiver: Any) -> Any:
        """Go's evalField: a method, a struct field or a map entry of the receiver."""
        if receiver is None:
            if self.missingkey == "error":
                self.fail(f"nil data; no entry for key {go_quote(name)}")
            return None
        typ = type_name(receiver)
        value, is_nil = indirect(receiver)
        if receiver is NIL:
            self.fail(f"nil pointer evaluating {typ}.{name}")
        method = _method(concrete(receiver), name) or _method(value, name)
        if method is not None:
            return self.call(dot, GoFunc(method, ()), False, node, name, args, final, bound=value)
        has_args = len(args or ()) > 1 or final is not MISSING
        kind = type_of(value).kind
        ftype = next((ft for f, ft, _ in value.type.fields if f == name), None) if kind == "struct" else None
        if ftype is not None:
            if has_args:
                self.fail(f"{name} has arguments but cannot be invoked as function")
            return element(value.data[name], ftype)
        if kind == "map":
            if has_args:
                self.fail(f"{name} is not a method but has arguments")
            mapping = map_of(value) or {}
            if name in mapping:
                return element(mapping[name], elem_type(value))
            if self.missingkey == "error":
                self.fail(f"map has no entry for key {go_quote(name)}")
            return zero(elem_type(value)) if self.missingkey == "zero" else None
        if is_nil and any(name == f for f, _, _ in (type_of(value).elem or ANY).fields):
            self.fail(f"nil pointer evaluating {typ}.{name}")
        self.fail(f"can't evaluate field {name} in type {typ}")

    def function(self, dot: Any, node: IdentifierNode, cmd: Node, args: list[Node] | None, final: Any) -> Any:
        self.node = node
        fn = self.funcs.get(node.name) or BUILTINS.get(node.name)
        if fn is None:
            self.fail(f"{go_quote(node.name)} is not a defined function")
        builtin = node.name in BUILTINS and node.name not in self.funcs
        return self.call(dot, fn, builtin, cmd, node.name, args, final)

    def call(self, dot: Any, fn: GoFunc, builtin: bool, node: Node, name: str, args: list[Node] | None,
             final: Any, bound: Any = MISSING) -> Any:
        args = args[1:] if args is not None else []
        count = len(args) + (final is not MISSING)
        if fn.variadic is not None and count < len(fn.params):
            self.fail(f"wrong number of args for {name}: want at least {len(fn.params)} got {len(args)}")
        if fn.variadic is None and count != len(fn.params):
            self.fail(f"wrong number of args for {name}: want {len(fn.params)} got {count}")
        kinds = [*fn.params, *[fn.variadic or ""] * max(0, count - len(fn.params))]
        if builtin and name in ("and", "or"):
            value = None
            for arg in args:
                value = self.arg(dot, "value", arg)
                if truth(value) == (name == "or"):
                    return value
            return final if final is not MISSING else value
        argv = [self.arg(dot, kind, arg) for kind, arg in zip(kinds, args, strict=False)]
        if final is not MISSING:
            argv.append(self.validate(final, kinds[count - 1]))
        if builtin and name == "call":  # newer Go (Ollama's) names the callee in errors
            argv.insert(0, node_str(args[0]) if args else f"<{type_name(final)} Value>")
        try:
            return fn.fn(*argv) if bound is MISSING else fn.fn(bound)
        except GoFuncError as e:
            self.node = node
            self.fail(f"error calling {name}: {e}")

    def arg(self, dot: Any, kind: str | None, node: Node) -> Any:
        """An argument for a parameter of this kind (Go's evalArg)."""
        self.node = node
        if isinstance(node, (FieldNode, VariableNode, ChainNode)):
            return self.validate(self.chain(dot, node, None, MISSING), kind)
        if isinstance(node, PipeNode):
            return self.validate(self.pipeline(dot, node), kind)
        if isinstance(node, IdentifierNode):
            return self.validate(self.function(dot, node, node, None, MISSING), kind)
        assert isinstance(node, LiteralNode)
        if node.kind == "dot":
            return self.validate(dot, kind)
        if node.kind == "nil":
            return None if kind != "string" else self.fail(f"cannot assign nil to {kind}")
        if kind == "string" and node.kind != "string":
            self.fail(f"expected string; found {node_str(node)}")
        return self.constant(node)

    def validate(self, value: Any, kind: str | None) -> Any:
        if kind in (None, "value"):
            return value
        if kind == "any":
            return concrete(value)
        value = concrete(value) if isinstance(value, Iface) else value
        if value is None:
            self.fail(f"invalid value; expected {kind}")
        if not isinstance(value, str):
            self.fail(f"wrong type for value; expected {kind}; got {type_name(value)}")
        return value


def _method(value: Any, name: str) -> Callable[[Any], Any] | None:
    if not isinstance(value, GoValue):
        return None
    string = value.type.string
    if name == "String" and string is not None:
        return lambda v: string(v.data)
    return value.type.methods.get(name)


class GoTemplate:
    """A parsed template: template.New(name).Option("missingkey=" + missingkey).Funcs(funcs).Parse(text), with
    missingkey "default", "zero" or "error". `root` is the parse tree; GoTemplateError where Go fails."""

    def __init__(self, text: str, funcs: Mapping[str, GoFunc] | None = None, *, name: str = "",
                 missingkey: str = "default") -> None:
        self.text, self.name, self.funcs, self.missingkey = text, name, dict(funcs or {}), missingkey
        try:
            self.root = Parser(text, name, {**BUILTINS, **self.funcs}).parse()
        except RecursionError:
            raise GoTemplateError(f"template: {name}: too deeply nested") from None

    def execute(self, data: Any, *, root: ListNode | None = None, funcs: Mapping[str, GoFunc] | None = None,
                missingkey: str | None = None) -> str:
        """Template.Execute with data: the text. `root` (by default the parsed tree) may be a changed copy of it;
        `funcs` and `missingkey` replace the template's own, as for a new template made from that tree."""
        run = _Exec(self, self.funcs if funcs is None else funcs, missingkey or self.missingkey)
        run.vars.append(["$", data])
        try:
            run.walk(data, self.root if root is None else root)
        except RecursionError:
            raise GoTemplateError(f"template: {self.name}: too deeply nested") from None
        return "".join(run.out)

    def copy_root(self) -> ListNode:
        return copy.deepcopy(self.root)
