"""Whether Ollama sees thinking in a Go TEMPLATE: its thinking.InferTags (thinking/template.go), in Python.

Ollama lists the "thinking" capability for a model whose TEMPLATE has thinking tags, and that capability
decides two things the fidelity check must model: a request without `think` is sent with `think: true`, and a
request with `think: true` to a model without it is refused (400 "does not support thinking"). The heuristic:
the first and last text nodes of the list around a `.Thinking` field inside a range over `.Messages`.
"""

from __future__ import annotations

from .gotemplate.nodes import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    Node,
    PipeNode,
    TextNode,
)
from .ollama_render import parse_template


def _children(node: Node) -> list[Node]:
    """What Ollama's templateVisit descends into (not a parenthesised chain's pipeline)."""
    if isinstance(node, ListNode):
        return list(node.nodes)
    if isinstance(node, BranchNode):
        return [node.pipe, node.list, *([node.else_list] if node.else_list is not None else [])]
    if isinstance(node, ActionNode):
        return [node.pipe]
    if isinstance(node, PipeNode):
        return list(node.cmds)
    if isinstance(node, CommandNode):
        return list(node.args)
    return []


def _uses_field(node: Node, name: str) -> bool:
    return (isinstance(node, FieldNode) and node.ident[0] == name) or any(
        _uses_field(child, name) for child in _children(node))


def think_tags(template: str) -> tuple[str, str]:
    """The (opening, closing) thinking tags Ollama infers from a Go TEMPLATE; ("", "") when none. GoTemplateError
    where the template does not parse."""
    tmpl, _ = parse_template(template)
    tags = ["", ""]

    def visit(node: Node, ancestors: list[Node]) -> None:
        ancestors = [*ancestors, node]
        if isinstance(node, FieldNode) and node.ident[0] == "Thinking":
            ranges = [a for a in ancestors if isinstance(a, BranchNode) and a.keyword == "range"]
            if ranges and _uses_field(ranges[-1].pipe, "Messages"):
                around = next(a for a in reversed(ancestors) if isinstance(a, ListNode))
                for index, edge in ((0, around.nodes[0]), (1, around.nodes[-1])):
                    if isinstance(edge, TextNode):
                        tags[index] = edge.text.strip()
        for child in _children(node):
            visit(child, ancestors)

    visit(tmpl.root, [])
    return tags[0], tags[1]


def knows_thinking(template: str) -> bool:
    """Whether Ollama gives a model with this TEMPLATE the thinking capability."""
    opening, closing = think_tags(template)
    return bool(opening and closing)
