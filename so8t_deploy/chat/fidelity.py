"""Conversation fidelity: the prompt a host renders for a conversation is the one the model was trained on.

A Go TEMPLATE is checked against the model's own chat template on fixed conversations: both are rendered here
(the Go side as Ollama renders /api/chat, see ollama_render; the Hugging Face side as apply_chat_template with
add_generation_prompt) and must be equal byte for byte, except for a leading BOS, which llama.cpp adds when it
tokenizes. The same conversations are later rendered by every host (`_debug_render_only`) in the smoke test.

A request's `think` is the template's `enable_thinking` (left out when the request has none) and a message's
`thinking` its `reasoning_content`, as Hugging Face templates name them. A conversation the model's own template
refuses (Gemma 2's "System role not supported") has no rendering to compare: it is skipped, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..builtin_templates import BUILTINS, BuiltinTemplate
from ..errors import ModelError
from .gotemplate import GoTemplateError
from .model_chat import ModelChat
from .ollama_render import render_chat
from .think_tags import knows_thinking

PROMPT = "Name a prime number."
CALL_ID = "a1b2c3d4e"  # Mistral's templates want nine alphanumerics
WEATHER_CALL = {"id": CALL_ID, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


@dataclass(frozen=True)
class Conversation:
    name: str
    messages: tuple[dict[str, Any], ...]  # in Ollama's /api/chat form
    needs_tools: bool = False  # asked only where the model's template knows tools
    think: bool | None = None  # the request's think (None: none sent)
    needs_thinking: bool = False  # asked only where the model's template knows thinking


ASK = {"role": "user", "content": PROMPT}
THOUGHT = {"role": "assistant", "content": "Seven.", "thinking": "Small primes: 2, 3, 5, 7."}
CONVERSATIONS = (
    Conversation("system and one user turn", (
        {"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": PROMPT})),
    Conversation("no system", ({"role": "user", "content": PROMPT},)),
    Conversation("multi-turn with assistant turns", (
        {"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "And an even one?"})),
    Conversation("a tool call and its result", (
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "22", "tool_call_id": CALL_ID, "tool_name": "get_weather"}), needs_tools=True),
    Conversation("multi-turn without a system message", (
        ASK, {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "And an even one?"})),
    Conversation("thinking turned off", (ASK,), think=False, needs_thinking=True),
    Conversation("thinking turned on", (ASK,), think=True, needs_thinking=True),
    Conversation("thinking left unset", (ASK,), needs_thinking=True),
    Conversation("the thinking of an earlier turn", (ASK, THOUGHT, {"role": "user", "content": "And an even one?"}),
                 needs_thinking=True),
    Conversation("thinking before a tool call, after an earlier thinking turn", (
        ASK, THOUGHT, {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "thinking": "The user wants the weather.", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "22", "tool_call_id": CALL_ID, "tool_name": "get_weather"}),
        needs_tools=True, needs_thinking=True),
)


@dataclass(frozen=True)
class ExpectedRender:
    """What a host must render for one conversation (the model's own rendering, less a leading BOS)."""

    conversation: str
    messages: tuple[dict[str, Any], ...]
    prompt: str
    think: bool | None = None  # the request's think


@dataclass(frozen=True)
class Refusal:
    """A conversation the model's own template refuses to render: not compared."""

    conversation: str
    error: str  # the template's own message

    def describe(self) -> str:
        return f"conversation {self.conversation!r} skipped: the model's own template refuses it ({self.error})"


@dataclass(frozen=True)
class Mismatch:
    conversation: str
    position: int
    expected: str
    rendered: str

    def describe(self) -> str:
        where = f"conversation {self.conversation!r} differs at character {self.position}"
        if self.rendered.startswith("error: "):
            return f"conversation {self.conversation!r}: the template fails: {self.rendered[7:]}"
        return (f"{where}: the model's template renders {_excerpt(self.expected, self.position)}, "
                f"this one {_excerpt(self.rendered, self.position)}")


def _excerpt(text: str, position: int, width: int = 24) -> str:
    piece = text[position:position + width]
    return repr(piece) + ("..." if len(text) > position + width else "") if piece else "the end"


def hf_messages(messages: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The conversation in the form Hugging Face chat templates read (OpenAI-style tool calls)."""
    out = []
    for m in messages:
        h: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            h["tool_calls"] = [{"id": c["id"], "type": "function", "function": dict(c["function"])}
                               for c in m["tool_calls"]]
        if "tool_call_id" in m:
            h["tool_call_id"], h["name"] = m["tool_call_id"], m.get("tool_name", "")
        if m.get("thinking"):
            h["reasoning_content"] = m["thinking"]
        out.append(h)
    return out


def conversations_for(chat: ModelChat) -> tuple[Conversation, ...]:
    tools, thinking = chat.uses("tools"), chat.knows_thinking
    return tuple(c for c in CONVERSATIONS if (tools or not c.needs_tools) and (thinking or not c.needs_thinking))


def template_error(error: ModelError) -> str:
    """The chat template's own message in a rendering failure (raise_exception's text)."""
    return str(error.__cause__ or error)


def model_render(chat: ModelChat, messages: tuple[dict[str, Any], ...], system: str | None,
                 think: bool | None = None) -> str:
    """The model's own rendering of a conversation as a host receives it, less a leading BOS; a Modelfile SYSTEM
    is the system message of a conversation that has none, as Ollama prepends it. ModelError where the model's
    template refuses it."""
    seen = list(messages)
    if system is not None and not any(m["role"] == "system" for m in seen):
        seen.insert(0, {"role": "system", "content": system})
    prompt = chat.render(hf_messages(tuple(seen)), enable_thinking=think)
    if chat.bos_token and prompt.startswith(chat.bos_token):
        prompt = prompt[len(chat.bos_token):]
    return prompt


def expected_renders(chat: ModelChat, system: str | None) -> tuple[tuple[ExpectedRender, ...], tuple[Refusal, ...]]:
    """The model's own rendering of each conversation, and the conversations its template refuses."""
    renders, refused = [], []
    for conversation in conversations_for(chat):
        try:
            prompt = model_render(chat, conversation.messages, system, conversation.think)
        except ModelError as e:
            refused.append(Refusal(conversation.name, template_error(e)))
            continue
        renders.append(ExpectedRender(conversation.name, conversation.messages, prompt, conversation.think))
    return tuple(renders), tuple(refused)


def first_difference(expected: str, rendered: str) -> int:
    return next((i for i, (a, b) in enumerate(zip(expected, rendered, strict=False)) if a != b),
                min(len(expected), len(rendered)))


def compare_rendered(expected: ExpectedRender, rendered: str) -> Mismatch | None:
    if rendered == expected.prompt:
        return None
    return Mismatch(expected.conversation, first_difference(expected.prompt, rendered), expected.prompt, rendered)


def check_template(go_template: str, expected: tuple[ExpectedRender, ...], system: str | None) -> Mismatch | None:
    """The first conversation this Go TEMPLATE renders differently from the model's own template, if any. As a
    host would: a TEMPLATE with thinking tags gets `think: true` where the request has none, one without them
    refuses `think: true` (Ollama's thinking capability, see think_tags)."""
    try:
        thinking = knows_thinking(go_template)
    except GoTemplateError as e:
        return Mismatch(expected[0].conversation, 0, expected[0].prompt, f"error: {e}") if expected else None
    for item in expected:
        think = True if item.think is None and thinking else item.think
        if think and not thinking:
            return Mismatch(item.conversation, 0, item.prompt, "error: a host refuses think: true for it (Ollama "
                            "sees thinking in a TEMPLATE only as .Thinking between tags in a range over .Messages)")
        try:
            rendered = render_chat(go_template, [dict(m) for m in item.messages], system=system, think=think)
        except GoTemplateError as e:
            return Mismatch(item.conversation, 0, item.prompt, f"error: {e}")
        mismatch = compare_rendered(item, rendered)
        if mismatch is not None:
            return mismatch
    return None


def choose_builtin(expected: tuple[ExpectedRender, ...],
                   system: str | None) -> tuple[BuiltinTemplate | None, list[tuple[str, Mismatch]]]:
    """The first built-in that renders every conversation as the model does; else the mismatches, closest first
    (most conversations passed, then the latest first difference)."""
    misses: list[tuple[str, Mismatch]] = []
    for builtin in BUILTINS.values():
        mismatch = check_template(builtin.text, expected, system)
        if mismatch is None:
            return builtin, []
        misses.append((builtin.name, mismatch))
    order = [e.conversation for e in expected]
    misses.sort(key=lambda m: (order.index(m[1].conversation), m[1].position), reverse=True)
    return None, misses
