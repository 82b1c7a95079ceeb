"""Go's text/template in Python: lexer, parser and executor with Go's semantics and error messages.

It follows Go's text/template as Ollama's Go (1.26) has it, for what chat templates use: text, actions and trim
markers, comments, if/else if/else, range over slices, maps (in key order) and integers (Go >= 1.22) with
break/continue and else, with (and else with, Go >= 1.23), variables with Go's scoping, field chains, methods
without arguments, pipelines, parenthesised commands, literals, the builtin functions (printf: the common verbs),
fmt's printing (String methods included), Option("missingkey=...") and encoding/json (gojson). Left out:
{{define}}, {{template}} and {{block}} (a clear GoTemplateError), complex constants, and printing a pointer
nested in a value (Go prints its address: a GoTemplateError).
"""

from .executor import GoTemplate
from .funcs import BUILTINS, sprintf
from .gojson import go_json
from .nodes import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    Node,
    PipeNode,
    identifiers,
    node_str,
)
from .values import (
    ANY,
    BOOL,
    FLOAT64,
    INT,
    NIL,
    STRING,
    UINT8,
    GoFunc,
    GoFuncError,
    GoTemplateError,
    GoType,
    GoValue,
    Iface,
    fmt_float,
    fmt_v,
    go_quote,
    truth,
    type_of,
)

__all__ = [
    "ANY", "BOOL", "BUILTINS", "FLOAT64", "INT", "NIL", "STRING", "UINT8", "ActionNode", "BranchNode", "CommandNode",
    "FieldNode", "GoFunc", "GoFuncError", "GoTemplate", "GoTemplateError", "GoType", "GoValue", "Iface", "ListNode",
    "Node", "PipeNode", "fmt_float", "fmt_v", "go_json", "go_quote", "identifiers", "node_str", "sprintf", "truth",
    "type_of",
]
