"""What a model's own files say about its conversation: the chat template, its special tokens and its EOS.

Read from a Hugging Face model directory the way transformers reads it: `chat_template.jinja` first, else the
`chat_template` of `tokenizer_config.json` (a string, or a list of named templates whose "default" is used);
special tokens may be strings or {"content": ...} objects; `generation_config.json` may list several EOS ids,
named through the tokenizer's added tokens. Rendering mirrors transformers' `apply_chat_template` environment
(sandboxed, trim_blocks and lstrip_blocks, `tojson` with ensure_ascii=False, `raise_exception`, `strftime_now`),
so the product can render the trained conversation without loading a tokenizer or importing transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ModelError
from ..jsonfile import read_bounded_text

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
MAX_CONFIG_BYTES = 64 << 20  # tokenizer.json of a 256k vocabulary is ~30 MiB
TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ModelChat:
    """The model's own chat template and the tokens that end its turns."""

    origin: str  # the file the template came from, for messages
    template: str
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the template sees them
    eos_tokens: tuple[str, ...]  # the tokenizer's EOS, then generation_config's, unique

    @property
    def bos_token(self) -> str:
        return self.special_tokens.get("bos_token", "")

    def render(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> str:
        """apply_chat_template's rendering; `enable_thinking` is passed to the template unless it is None."""
        return render_hf(self.template, messages, special_tokens=self.special_tokens, tools=tools,
                         add_generation_prompt=add_generation_prompt, origin=self.origin,
                         enable_thinking=enable_thinking)

    def uses(self, name: str) -> bool:
        """Whether the template reads the variable `name` (tools, enable_thinking, ...)."""
        from jinja2 import meta

        return name in meta.find_undeclared_variables(_environment().parse(self.template))

    @property
    def knows_thinking(self) -> bool:
        """Whether the template can be asked to think, or renders a message's thinking (reasoning_content)."""
        return self.uses("enable_thinking") or "reasoning_content" in self.template


def _read_json(path: Path, what: str) -> dict[str, Any]:
    text = read_bounded_text(path, MAX_CONFIG_BYTES, what, ModelError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return cast(str, value["content"])
    return None


def _template_from_config(config: dict[str, Any], path: Path) -> str | None:
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        if isinstance(default, str):
            return default
    raise ModelError(f"{path}: chat_template: expected a string or a list of named templates with a 'default'")


def _added_tokens(model_dir: Path, config: dict[str, Any]) -> dict[int, str]:
    """Token id -> text for the added (special) tokens: tokenizer_config's decoder, else tokenizer.json's list."""
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict) and decoder:
        return {int(i): t for i, v in decoder.items() if str(i).isdigit() and (t := _token_text(v)) is not None}
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        return {}
    added = _read_json(tokenizer_json, "tokenizer").get("added_tokens")
    return {a["id"]: a["content"] for a in added or [] if isinstance(a, dict) and isinstance(a.get("id"), int)
            and isinstance(a.get("content"), str)}


def _generation_eos(model_dir: Path, config: dict[str, Any]) -> list[str]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    ids = _read_json(path, "generation config").get("eos_token_id")
    id_list = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    names = _added_tokens(model_dir, config)
    missing = [i for i in id_list if not isinstance(i, int) or i not in names]
    if missing:
        raise ModelError(f"{path}: eos_token_id {missing[0]!r} is not one of the tokenizer's added tokens")
    return [names[i] for i in id_list]


def read_model_chat(model_dir: Path) -> ModelChat | None:
    """The model's chat template and tokens, or None when it has no chat template (a base model)."""
    config_path = model_dir / "tokenizer_config.json"
    config = _read_json(config_path, "tokenizer config") if config_path.is_file() else {}
    template_path = model_dir / TEMPLATE_FILE
    if template_path.is_file():
        template: str | None = read_bounded_text(template_path, MAX_CONFIG_BYTES, "chat template", ModelError)
        origin = template_path
    else:
        template, origin = _template_from_config(config, config_path), config_path
    if not template:
        return None
    special = {key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key))) is not None}
    eos = [special["eos_token"]] if "eos_token" in special else []
    eos += _generation_eos(model_dir, config)
    return ModelChat(origin=str(origin), template=template, special_tokens=special,
                     eos_tokens=tuple(dict.fromkeys(eos)))


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def render_hf(template: str, messages: list[dict[str, Any]], *, special_tokens: dict[str, str],
              tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
              origin: str = "chat_template", enable_thinking: bool | None = None) -> str:
    """The prompt transformers' apply_chat_template(..., tokenize=False) renders (`enable_thinking` is one of its
    template kwargs, left undefined when None)."""
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    try:
        compiled = _environment().from_string(template)
        return compiled.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens, **kwargs)
    except jinja2.TemplateError as e:
        raise ModelError(f"{origin}: the chat template fails to render: {e}") from e
