"""The parse tree (text/template/parse/node.go): nodes, their String() form and Ollama's identifier walk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Node:
    """pos: where the node starts in the template text (a character index; error messages count bytes)."""

    pos: int


@dataclass(eq=False)
class TextNode(Node):
    text: str


@dataclass(eq=False)
class ListNode(Node):
    nodes: list[Node] = field(default_factory=list)


@dataclass(eq=False)
class FieldNode(Node):  # .A.B
    ident: list[str]


@dataclass(eq=False)
class VariableNode(Node):  # $x.A
    ident: list[str]


@dataclass(eq=False)
class ChainNode(Node):  # (pipeline).A
    node: Node
    fields: list[str]


@dataclass(eq=False)
class IdentifierNode(Node):  # a function name
    name: str


@dataclass(eq=False)
class LiteralNode(Node):
    """., nil, true/false, numbers and strings: `text` as written, `value` as Go holds the constant."""

    kind: str  # dot, nil, bool, number, string
    text: str
    value: Any = None


@dataclass(eq=False)
class CommandNode(Node):
    args: list[Node] = field(default_factory=list)


@dataclass(eq=False)
class PipeNode(Node):
    line: int
    is_assign: bool = False
    decl: list[VariableNode] = field(default_factory=list)
    cmds: list[CommandNode] = field(default_factory=list)


@dataclass(eq=False)
class ActionNode(Node):
    pipe: PipeNode


@dataclass(eq=False)
class BranchNode(Node):
    keyword: str  # if, range, with
    pipe: PipeNode
    list: ListNode
    else_list: ListNode | None


@dataclass(eq=False)
class ControlNode(Node):
    keyword: str  # break, continue; end and else only while parsing


def node_str(n: Node) -> str:
    """Go's Node.String(): the node as template text (the context of exec errors)."""
    if isinstance(n, TextNode):
        return n.text
    if isinstance(n, ListNode):
        return "".join(map(node_str, n.nodes))
    if isinstance(n, FieldNode):
        return "." + ".".join(n.ident)
    if isinstance(n, VariableNode):
        return ".".join(n.ident)
    if isinstance(n, ChainNode):
        inner = f"({node_str(n.node)})" if isinstance(n.node, PipeNode) else node_str(n.node)
        return inner + "".join("." + f for f in n.fields)
    if isinstance(n, IdentifierNode):
        return n.name
    if isinstance(n, LiteralNode):
        return n.text
    if isinstance(n, CommandNode):
        return " ".join(f"({node_str(a)})" if isinstance(a, PipeNode) else node_str(a) for a in n.args)
    if isinstance(n, PipeNode):
        decl = ", ".join(map(node_str, n.decl)) + " := " if n.decl else ""
        return decl + " | ".join(map(node_str, n.cmds))
    if isinstance(n, ActionNode):
        return "{{" + node_str(n.pipe) + "}}"
    if isinstance(n, BranchNode):
        else_part = "{{else}}" + node_str(n.else_list) if n.else_list is not None else ""
        return f"{{{{{n.keyword} {node_str(n.pipe)}}}}}{node_str(n.list)}{else_part}{{{{end}}}}"
    assert isinstance(n, ControlNode)
    return "{{" + n.keyword + "}}"


def identifiers(node: Node) -> list[str]:
    """The field and variable names in a tree, the way Ollama's template.Identifiers collects them (not the
    variables a pipeline declares, not the fields of a parenthesised chain)."""
    if isinstance(node, ListNode):
        return [name for child in node.nodes for name in identifiers(child)]
    if isinstance(node, ActionNode):
        return identifiers(node.pipe)
    if isinstance(node, BranchNode):
        lists = [node.list] + ([node.else_list] if node.else_list is not None else [])
        return identifiers(node.pipe) + [name for branch in lists for name in identifiers(branch)]
    if isinstance(node, PipeNode):
        return [name for cmd in node.cmds for arg in cmd.args for name in identifiers(arg)]
    if isinstance(node, (FieldNode, VariableNode)):
        return list(node.ident)
    return []
