"""The prompt of a "native" model: the GGUF's Jinja chat template, applied as llama-server applies it.

Current Ollama does not render such a model's prompt itself: it sends the messages to llama-server
(llm/llama_server.go llamaServerChatRequest, /apply-template for `_debug_render_only`, /v1/chat/completions to
generate), and llama.cpp renders the template (common/chat.cpp): `messages`, `tools` (only when there are any),
`bos_token`, `eos_token`, `enable_thinking`, the chat_template_kwargs Ollama sends (`enable_thinking`, and
`reasoning_effort` for a string think value) and `add_generation_prompt` (true); then it strips one leading BOS
text when the vocabulary adds BOS itself (and one trailing EOS when it adds EOS). A trailing assistant message is
a prefill: rendered without it, with the generation prompt, and its content appended. Without any chat template
llama.cpp falls back to ChatML.

The Jinja environment is Hugging Face's (transformers' chat-template compiler, which llama.cpp's engine follows):
a sandbox with trim_blocks, lstrip_blocks and loop controls, `tojson` (ensure_ascii off), `raise_exception` and
`strftime_now`.

Approximations: llama.cpp's per-format handlers (which may rewrite messages or add a system prompt for tools),
its message normalization for templates that want typed content or object arguments, and the truncation of
old messages to num_ctx are left out; tool-call arguments reach the template as the JSON string llama-server
receives.
"""

from __future__ import annotations

import contextlib
import functools
import json
from datetime import datetime

from tests.gotemplate.gofmt import go_json

# llama.cpp's CHATML_TEMPLATE_SRC, the template of a model whose GGUF has none.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}"
)


class JinjaError(ValueError):
    """The chat template failed to compile or to render (raise_exception included)."""


def _raise_exception(message: str):
    raise JinjaError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=64)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise JinjaError(f"chat template does not compile: {exc}") from None


def think_bool(think: object) -> bool:
    """api.ThinkValue.Bool: true, or one of the effort levels."""
    return think is True or think in ("high", "medium", "low", "max")


def template_kwargs(think: object) -> dict:
    """llamaServerChatTemplateKwargs: nothing without a think value."""
    if think is None:
        return {}
    kwargs: dict = {"enable_thinking": think_bool(think)}
    if isinstance(think, str) and think:
        kwargs["reasoning_effort"] = think
    return kwargs


def template_message(message: dict) -> dict:
    """One api.Message as llama-server receives it (llamaServerChatMessage) and hands it to the template
    (common_chat_msgs_to_json_oaicompat): role, content ("" when empty, null beside tool calls), the tool
    name as `name`, tool_call_id, tool_calls with their arguments as a JSON string. Thinking is not sent."""
    calls = message.get("tool_calls") or []
    out: dict = {"role": message.get("role", ""),
                 "content": message.get("content") or ("" if not calls else None)}
    if message.get("tool_name"):
        out["name"] = message["tool_name"]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    if calls:
        out["tool_calls"] = []
        for call in calls:
            function = call.get("function") or {}
            entry = {"type": "function", "function": {"name": function.get("name", ""), "arguments": go_json(
                function.get("arguments") or {}, sort_keys=False)}}
            if call.get("id"):
                entry["id"] = call["id"]
            out["tool_calls"].append(entry)
    return out


def template_tools(tools: list[dict]) -> list[dict]:
    """common_chat_tools_to_json_oaicompat: each function tool as type, name, description and parameters."""
    out = []
    for tool in tools:
        function = (tool or {}).get("function") or {}
        out.append({"type": "function", "function": {"name": function.get("name", ""),
                                                      "description": function.get("description", ""),
                                                      "parameters": function.get("parameters") or {}}})
    return out


def _piece(vocab, token: int) -> str:
    """common_token_to_piece(vocab, token, special=true); "" for LLAMA_TOKEN_NULL."""
    import ctypes

    import llama_cpp

    if token < 0:
        return ""
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", "replace")
        size = -n


def vocab_strings(vocab) -> tuple[str, str, bool, bool]:
    """The BOS and EOS texts of a llama.cpp vocabulary and whether tokenizing adds them."""
    import llama_cpp

    return (_piece(vocab, llama_cpp.llama_vocab_bos(vocab)), _piece(vocab, llama_cpp.llama_vocab_eos(vocab)),
            bool(llama_cpp.llama_vocab_get_add_bos(vocab)), bool(llama_cpp.llama_vocab_get_add_eos(vocab)))


@functools.lru_cache(maxsize=16)
def _file_vocab_strings(path: str, key: tuple) -> tuple[str, str, bool, bool]:
    """vocab_strings of a GGUF whose model is not loaded: llama.cpp reads its vocabulary only."""
    import llama_cpp

    try:  # what Llama(verbose=False) does to keep llama.cpp's loader log quiet
        from llama_cpp._utils import suppress_stdout_stderr
        quiet = suppress_stdout_stderr(disable=False)
    except ImportError:
        quiet = contextlib.nullcontext()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with quiet:
        model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise JinjaError(f"llama.cpp could not read the vocabulary of {path}")
    try:
        return vocab_strings(llama_cpp.llama_model_get_vocab(model))
    finally:
        llama_cpp.llama_model_free(model)


def gguf_vocab_strings(path, llm=None) -> tuple[str, str, bool, bool]:
    """vocab_strings of the loaded llama_cpp.Llama when there is one, else of the GGUF (cached per file)."""
    if llm is not None:
        return vocab_strings(llm._model.vocab)
    stat = path.stat()
    return _file_vocab_strings(str(path), (stat.st_size, stat.st_mtime_ns))


def render(source: str, messages: list[dict], *, tools: list[dict] | None, think: object,
           vocab: tuple[str, str, bool, bool]) -> str:
    """The prompt llama-server builds for these api.Messages (see the module doc)."""
    bos, eos, add_bos, add_eos = vocab
    converted = [template_message(m) for m in messages]
    prefill = None
    if converted and converted[-1]["role"] == "assistant":
        prefill = converted.pop()
        if converted and converted[-1]["role"] == "assistant":
            raise JinjaError("Cannot have 2 or more assistant messages at the end of the list.")
    context: dict = {"messages": converted, "bos_token": bos, "eos_token": eos, "enable_thinking": True}
    if tools:
        context["tools"] = template_tools(tools)
    context.update(template_kwargs(think))
    context["add_generation_prompt"] = True
    try:
        text = _compile(source or CHATML_TEMPLATE).render(**context)
    except JinjaError:
        raise
    except Exception as exc:  # the template's own failure, as llama-server reports it
        raise JinjaError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    if add_bos and text.startswith(bos):
        text = text[len(bos):]
    if add_eos and text.endswith(eos):
        text = text[:len(text) - len(eos)]
    if prefill is not None:
        text += prefill["content"] or ""
    return text
