"""The prompt an Ollama server renders for /api/chat from a Go TEMPLATE, predicted without Go or a server.

It follows Ollama's source (github.com/ollama/ollama at fb30760): the chat handler (server/routes.go) prepends
the Modelfile SYSTEM when the first message is not a system message and turns the request's think into
Values.Think/ThinkLevel/IsThinkSet (server/prompt.go); chatPrompt tags images ([img-N]); template.Execute
collates the messages and either runs the template once with .Messages (converted to Ollama's template types)
and .Tools, or, for a template without .Messages, once per turn with .System/.Prompt/.Response and the last turn
cut after its {{ .Response }}. Printing and the `json` function are Go's fmt and encoding/json, byte for byte.

Not modelled (they depend on the model, not on the template): context-window truncation, filterThinkTags for
qwen3/deepseek-r1, the think default of thinking-capable models (Ollama sends think=True when a request has
none: pass it), built-in renderers and harmony, and the GGUF's own chat template.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Mapping
from typing import Any

from .gotemplate import (
    ANY,
    INT,
    STRING,
    UINT8,
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    GoFunc,
    GoTemplate,
    GoTemplateError,
    GoType,
    GoValue,
    ListNode,
    Node,
    PipeNode,
    go_json,
    identifiers,
)
from .gotemplate.gojson import json_or_empty, json_string

__all__ = ["GoTemplateError", "render_chat", "template_vars"]


# ------------------------------------------------------------------------- Ollama's api and template types
def _typescript(p: GoValue) -> str:
    """api.ToolProperty.ToTypeScriptType."""
    if p.data["AnyOf"].data:
        return " | ".join(_typescript(alternative) for alternative in p.data["AnyOf"].data)
    names = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean", "array": "any[]",
             "object": "Record<string, any>", "null": "null"}
    return " | ".join(names.get(name, "any") for name in p.data["Type"].data or []) or "any"


def _not_printable(_: Any) -> str:
    raise GoTemplateError("printing a *api.ToolPropertiesMap is not supported: Go prints a pointer address")


def _ordered(props: GoValue | None) -> str:
    """ToolPropertiesMap.MarshalJSON: the properties in the order they came."""
    if props is None:
        return "null"
    return "{" + ",".join(f"{json_string(k)}:{go_json(v)}" for k, v in props.data.items()) + "}"


def _go_struct(name: str, *fields: tuple[str, GoType, str]) -> GoType:
    return GoType(name, "struct", fields=fields)


STRINGS = GoType("[]string", "slice", STRING)
ANY_SLICE = GoType("[]interface {}", "slice", ANY)
ANY_MAP = GoType("map[string]interface {}", "map", ANY)
# api (api/types.go): a tool's JSON schema, and images
PROPERTY_TYPE = GoType("api.PropertyType", "slice", STRING,
                       string=lambda d: "" if not d else d[0] if len(d) == 1 else "[" + " ".join(d) + "]",
                       marshal=lambda d: go_json(d[0]) if d and len(d) == 1 else go_json(list(d or [])))
TOOL_PROPERTY = GoType("api.ToolProperty", "struct")  # its fields follow: the type is recursive
TOOL_PROPERTIES = GoType("[]api.ToolProperty", "slice", TOOL_PROPERTY)
PROPERTY_MAP = GoType("map[string]api.ToolProperty", "map", TOOL_PROPERTY)
PROPERTIES = GoType("api.ToolPropertiesMap", "struct", string=_not_printable)  # data: name -> property, in order
PROPERTIES_PTR = GoType("*api.ToolPropertiesMap", "ptr", PROPERTIES, marshal=_ordered, methods={
    "Len": lambda v: len(v.data) if v.type is PROPERTIES else 0,  # (nil-safe, as Ollama's)
    "ToMap": lambda v: GoValue(PROPERTY_MAP, v.data if v.type is PROPERTIES else None)})
TOOL_PROPERTY.fields = (
    ("AnyOf", TOOL_PROPERTIES, "anyOf,omitempty"), ("Type", PROPERTY_TYPE, "type,omitempty"),
    ("Items", ANY, "items,omitempty"), ("Description", STRING, "description,omitempty"),
    ("Enum", ANY_SLICE, "enum,omitempty"), ("Properties", PROPERTIES_PTR, "properties,omitempty"),
    ("Required", STRINGS, "required,omitempty"))
IMAGE_DATA = GoType("api.ImageData", "slice", UINT8)
IMAGES = GoType("[]api.ImageData", "slice", IMAGE_DATA)
# template (template/template.go): what .Messages and .Tools hold
TEMPLATE_ARGS = GoType("template.templateArgs", "map", ANY,
                       string=lambda d: "{}" if d is None else json_or_empty(GoValue(ANY_MAP, d)))
TEMPLATE_PROPERTIES = GoType("template.templateProperties", "map", TOOL_PROPERTY,
                             string=lambda d: "{}" if d is None else json_or_empty(GoValue(PROPERTY_MAP, d)))
TOOL_CALL_FUNCTION = _go_struct("template.templateToolCallFunction",
                                ("Index", INT, ""), ("Name", STRING, ""), ("Arguments", TEMPLATE_ARGS, ""))
TOOL_CALL = _go_struct("template.templateToolCall", ("ID", STRING, ""), ("Function", TOOL_CALL_FUNCTION, ""))
TOOL_CALLS = GoType("[]template.templateToolCall", "slice", TOOL_CALL)
MESSAGE = _go_struct("template.templateMessage", ("Role", STRING, ""), ("Content", STRING, ""),
                     ("Thinking", STRING, ""), ("Images", IMAGES, ""), ("ToolCalls", TOOL_CALLS, ""),
                     ("ToolName", STRING, ""), ("ToolCallID", STRING, ""))
MESSAGE_PTR = GoType("*template.templateMessage", "ptr", MESSAGE)
MESSAGES = GoType("[]*template.templateMessage", "slice", MESSAGE_PTR)
TOOL_PARAMETERS = _go_struct("template.templateToolFunctionParameters", ("Type", STRING, "type"),
                             ("Defs", ANY, "$defs,omitempty"), ("Items", ANY, "items,omitempty"),
                             ("Required", STRINGS, "required,omitempty"),
                             ("Properties", TEMPLATE_PROPERTIES, "properties"))
TOOL_FUNCTION = _go_struct("template.templateToolFunction", ("Name", STRING, "name"),
                           ("Description", STRING, "description"), ("Parameters", TOOL_PARAMETERS, "parameters"))
TOOL = _go_struct("template.templateTool", ("Type", STRING, "type"), ("Items", ANY, "items,omitempty"),
                  ("Function", TOOL_FUNCTION, "function"))
TOOL.string = lambda d: json_or_empty(GoValue(TOOL, d))
TOOLS = GoType("template.templateTools", "slice", TOOL)
TOOLS.string = lambda d: json_or_empty(GoValue(TOOLS, d))


# ------------------------------------------------------------------------------------ decoding the request
def _get(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...] = object, default: Any = None) -> Any:
    """A field as encoding/json decodes it into a struct: keys match case-insensitively (the last one wins),
    null leaves the default, a value of another JSON type is an error."""
    value = default
    for key, item in obj.items():
        if key.lower() == name.lower():
            value = default if item is None else item
    if value is not default and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
        raise ValueError(f"json: cannot unmarshal {type(value).__name__} into field {name}")
    return value


def _any(v: Any) -> Any:
    """A JSON value decoded into Go's interface{}: numbers are float64."""
    if isinstance(v, Mapping):
        return {str(k): _any(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_any(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if v is None or isinstance(v, (str, bool, float)):
        return v
    raise ValueError(f"not a JSON value: {v!r}")


def _strings(v: Any) -> GoValue:
    if v is not None and not all(isinstance(s, str) for s in v):
        raise ValueError("json: cannot unmarshal a non-string into []string")
    return GoValue(STRINGS, None if v is None else list(v))


def _property_type(obj: Mapping[str, Any]) -> GoValue:
    present = any(k.lower() == "type" for k in obj)
    raw = _get(obj, "type", (str, list), "" if present else None)  # Ollama's UnmarshalJSON makes null [""]
    return GoValue(PROPERTY_TYPE, None if raw is None else [raw] if isinstance(raw, str) else _strings(raw).data)


def _property(obj: Any) -> GoValue:
    """An api.ToolProperty (unknown schema keywords are dropped, as Go's decoder drops them)."""
    if not isinstance(obj, Mapping):
        raise ValueError("json: cannot unmarshal a non-object into api.ToolProperty")
    any_of, enum = _get(obj, "anyOf", list), _get(obj, "enum", list)
    return GoValue(TOOL_PROPERTY, {
        "AnyOf": GoValue(TOOL_PROPERTIES, None if any_of is None else [_property(p) for p in any_of]),
        "Type": _property_type(obj), "Items": _any(_get(obj, "items")),
        "Description": _get(obj, "description", str, ""), "Enum": GoValue(ANY_SLICE, _any(enum)),
        "Properties": _properties_ptr(_get(obj, "properties", Mapping)),
        "Required": _strings(_get(obj, "required", list))})


def _properties_ptr(props: Mapping[str, Any] | None) -> GoValue:
    if props is None:
        return GoValue(PROPERTIES_PTR, None)
    return GoValue(PROPERTIES_PTR, GoValue(PROPERTIES, {str(k): _property(p) for k, p in props.items()}))


def _tool(obj: Any) -> GoValue:
    """An api.Tool as Ollama's convertToolsForTemplate turns it into a template.templateTool."""
    if not isinstance(obj, Mapping):
        raise ValueError("json: cannot unmarshal a non-object into api.Tool")
    function = _get(obj, "function", Mapping, {})
    params = _get(function, "parameters", Mapping, {})
    props = _properties_ptr(_get(params, "properties", Mapping)).data
    parameters = GoValue(TOOL_PARAMETERS, {
        "Type": _get(params, "type", str, ""), "Defs": _any(_get(params, "$defs")),
        "Items": _any(_get(params, "items")), "Required": _strings(_get(params, "required", list)),
        "Properties": GoValue(TEMPLATE_PROPERTIES, None if props is None else dict(props.data))})
    return GoValue(TOOL, {"Type": _get(obj, "type", str, ""), "Items": _any(_get(obj, "items")),
                          "Function": GoValue(TOOL_FUNCTION, {"Name": _get(function, "name", str, ""),
                                                              "Description": _get(function, "description", str, ""),
                                                              "Parameters": parameters})})


def _tool_call(obj: Any) -> GoValue:
    if not isinstance(obj, Mapping):
        raise ValueError("json: cannot unmarshal a non-object into api.ToolCall")
    function = _get(obj, "function", Mapping, {})
    arguments = _get(function, "arguments", Mapping)
    return GoValue(TOOL_CALL, {"ID": _get(obj, "id", str, ""), "Function": GoValue(TOOL_CALL_FUNCTION, {
        "Index": _get(function, "index", int, 0), "Name": _get(function, "name", str, ""),
        "Arguments": GoValue(TEMPLATE_ARGS, None if arguments is None else _any(arguments))})})


def _image(text: Any) -> bytes:
    """An api.ImageData: base64 (encoding/json's []byte; line breaks are skipped)."""
    if not isinstance(text, str):
        raise ValueError("json: cannot unmarshal a non-string into api.ImageData")
    return base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True)


def _message(obj: Any) -> dict[str, Any]:
    """An api.Message (its role lower-cased, as Ollama's UnmarshalJSON does), as template fields."""
    if not isinstance(obj, Mapping):
        raise ValueError("json: cannot unmarshal a non-object into api.Message")
    images = _get(obj, "images", list)
    calls = _get(obj, "tool_calls", list)
    return {"Role": _get(obj, "role", str, "").lower(), "Content": _get(obj, "content", str, ""),
            "Thinking": _get(obj, "thinking", str, ""),
            "Images": None if images is None else [_image(i) for i in images],
            "ToolCalls": [_tool_call(c) for c in calls or ()] or None, "ToolName": _get(obj, "tool_name", str, ""),
            "ToolCallID": _get(obj, "tool_call_id", str, "")}


# ------------------------------------------------------------------------------------------------- rendering
def _ts(v: Any) -> str:
    """Ollama's toTypeScriptType function."""
    if isinstance(v, GoValue) and v.type is TOOL_PROPERTY:
        return _typescript(v)
    if isinstance(v, GoValue) and v.type.kind == "ptr" and v.type.elem is TOOL_PROPERTY and v.data is not None:
        return _typescript(v.data)
    return "any"


FUNCS = {
    "json": GoFunc(json_or_empty, ("any",)),
    "currentDate": GoFunc(lambda *_: datetime.date.today().isoformat(), (), "string"),
    "yesterdayDate": GoFunc(lambda *_: (datetime.date.today() - datetime.timedelta(1)).isoformat(), (), "string"),
    "toTypeScriptType": GoFunc(_ts, ("any",)),
}
THINK_LEVELS = ("high", "medium", "low", "max")


def _response_action() -> ActionNode:
    """The {{ .Response }} Ollama's template.Parse appends to a template that names neither it nor .Messages."""
    return ActionNode(0, PipeNode(0, 0, cmds=[CommandNode(0, [FieldNode(0, ["Response"])])]))


def parse_template(template: str) -> tuple[GoTemplate, frozenset[str]]:
    """Ollama's template.Parse: the template and its Vars (lower-cased identifiers)."""
    tmpl = GoTemplate(template, FUNCS, missingkey="zero")
    names = frozenset(name.lower() for name in identifiers(tmpl.root))
    if "messages" not in names and "response" not in names:
        tmpl.root.nodes.append(_response_action())
        names |= {"response"}
    return tmpl, names


def template_vars(template: str) -> frozenset[str]:
    """The identifiers Ollama's Template.Vars() lists for this template (after Parse added {{ .Response }}),
    lower-cased; GoTemplateError where Ollama's template.Parse fails."""
    return parse_template(template)[1]


def _collate(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Consecutive messages of one role (tool messages excepted) merge with a blank line; every system message
    joins the system prompt."""
    system, out = [], []  # type: list[str], list[dict[str, Any]]
    for m in messages:
        if m["Role"] == "system":
            system.append(m["Content"])
        if out and out[-1]["Role"] == m["Role"] and m["Role"] != "tool":
            out[-1]["Content"] += "\n\n" + m["Content"]
        else:
            out.append(m)
    return "\n\n".join(system), out


def _template_message(m: dict[str, Any]) -> GoValue:
    """A *template.templateMessage, as convertMessagesForTemplate makes it."""
    images = None if m["Images"] is None else [GoValue(IMAGE_DATA, list(i)) for i in m["Images"]]
    return GoValue(MESSAGE_PTR, GoValue(MESSAGE, {
        **m, "Images": GoValue(IMAGES, images), "ToolCalls": GoValue(TOOL_CALLS, m["ToolCalls"])}))


def _cut_after_response(root: Node) -> Node | None:
    """Ollama's deleteNode with its predicate: every node after the first .Response field goes, in its walk
    order and with its quirks (a pipeline whose later command loses its arguments goes whole; an else branch
    after the cut makes Go panic)."""
    cut = False

    def walk(n: Node) -> Node | None:
        nonlocal cut
        if isinstance(n, FieldNode) and "Response" in n.ident:
            cut = True
        elif cut:
            return None
        if isinstance(n, ListNode):
            n.nodes = [kept for kept in map(walk, n.nodes) if kept is not None]
        elif isinstance(n, BranchNode):
            n.list = _must_list(walk(n.list))
            n.else_list = _must_list(walk(n.else_list)) if n.else_list is not None else None
        elif isinstance(n, ActionNode):
            pipe = walk(n.pipe)
            if pipe is None:
                return None
        elif isinstance(n, PipeNode):
            for cmd in n.cmds:
                cmd.args = [kept for kept in map(walk, cmd.args) if kept is not None]
                if not cmd.args:
                    return None
        return n

    return walk(root)


def _must_list(n: Node | None) -> ListNode:
    if not isinstance(n, ListNode):
        raise GoTemplateError("panic: interface conversion: parse.Node is nil, not *parse.ListNode")
    return n


def _execute_legacy(tmpl: GoTemplate, messages: list[dict[str, Any]], think: dict[str, Any]) -> str:
    """template.Execute for a template without .Messages: one run per completed turn, then the last turn up to
    its {{ .Response }} in a fresh template (no Ollama functions, Go's default missingkey)."""
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def flush() -> None:
        out.append(tmpl.execute({**turn, **think}))
        turn.update(System="", Prompt="", Response="")

    for m in messages:
        role, content = m["Role"], m["Content"]
        if role == "system" and (turn["Prompt"] or turn["Response"]) or role == "user" and turn["Response"]:
            flush()
        key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(role)
        if key:
            turn[key] = content
    root = _cut_after_response(tmpl.copy_root())
    assert isinstance(root, ListNode)
    out.append(tmpl.execute({**turn, **think}, root=root, funcs={}, missingkey="default"))
    return "".join(out)


def _with_image_tags(messages: list[dict[str, Any]]) -> None:
    """chatPrompt's [img-N] tags: each image's tag replaces an [img] in its message, or goes before its text."""
    count = 0
    for m in messages:
        prefix, prompt = "", m["Content"]
        for _ in m["Images"] or ():
            tag, count = f"[img-{count}]", count + 1
            if "[img]" in prompt:
                prompt = prompt.replace("[img]", tag, 1)
            else:
                prefix += tag
        m["Content"] = prefix + prompt


def _think_values(think: bool | str | None) -> dict[str, Any]:
    """How server/prompt.go turns a request's think into Values.Think, ThinkLevel and IsThinkSet."""
    if isinstance(think, str) and think not in THINK_LEVELS:
        raise ValueError(f'invalid think value: "{think}" (must be "high", "medium", "low", "max", true, or false)')
    if think is None:
        return {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
    level = think if isinstance(think, str) else "medium" if think else ""
    return {"Think": bool(think), "ThinkLevel": level, "IsThinkSet": True}


def render_chat(template: str, messages: list[dict[str, Any]], *, system: str | None = None,
                tools: list[dict[str, Any]] | None = None, think: bool | str | None = None) -> str:
    """The prompt Ollama renders for an /api/chat request with these messages (Ollama's API form), tools and
    think (None: the request has none), for a model whose TEMPLATE is `template` and SYSTEM is `system`.
    GoTemplateError where Ollama's template fails; ValueError for messages or tools Ollama would refuse."""
    decoded = [_message(m) for m in messages]
    if decoded and decoded[0]["Role"] != "system" and system:
        decoded.insert(0, _message({"role": "system", "content": system}))
    _with_image_tags(decoded)
    think_values = _think_values(think)
    template_tools = None if tools is None else [_tool(t) for t in tools]
    tmpl, names = parse_template(template)
    system_prompt, collated = _collate(decoded)
    if "messages" not in names:
        return _execute_legacy(tmpl, collated, think_values)
    return tmpl.execute({
        "System": system_prompt, "Messages": GoValue(MESSAGES, [_template_message(m) for m in collated] or None),
        "Tools": GoValue(TOOLS, template_tools), "Response": "", **think_values})
