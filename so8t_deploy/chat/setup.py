"""One manifest's conversation: which Go TEMPLATE every tag ships, its stop tokens, and what hosts must render.

`modelfile.template: auto` picks the built-in whose rendering equals the model's own chat template on every
fixed conversation (fidelity.CONVERSATIONS); a named built-in or a custom `.j2` template is checked the same
way, unless `modelfile.unchecked_template` names it. Stops are the template's end-of-turn token and the
model's EOS tokens (the tokenizer's and every one `generation_config.json` lists), never a fixed list.
A conversation the model's own template refuses is not compared (ChatSetup.refused); a Modelfile SYSTEM for a model
whose template refuses any system message is refused, since Ollama would add it to every conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..builtin_templates import AUTO, BUILTINS, BuiltinTemplate
from ..errors import ManifestError, ModelError
from ..manifest.schema import Modelfile
from .fidelity import (
    PROMPT,
    ExpectedRender,
    Mismatch,
    Refusal,
    check_template,
    choose_builtin,
    expected_renders,
    model_render,
    template_error,
)
from .model_chat import ModelChat, read_model_chat

HOW_TO_BRING = ("bring your own: modelfile.template: path/to/modelfile.j2 (README: \"Chat templates\"), "
                "or modelfile.unchecked_template naming it to skip this check")


@dataclass(frozen=True)
class ChatSetup:
    template_name: str  # a built-in's name or the path of a custom .j2
    builtin: BuiltinTemplate | None
    stops: tuple[str, ...]
    expected: tuple[ExpectedRender, ...] = ()  # empty: nothing to check (unchecked, or no model template)
    capabilities: tuple[str, ...] = ()  # what hosts must list for it: the model's template has tools/thinking
    model_chat: ModelChat | None = None
    known: bool = True  # False: `auto` with the model's files not on this machine yet (a hub model, offline)
    refused: tuple[Refusal, ...] = ()  # conversations the model's own template refuses: not compared

    def check_custom(self, go_template: str, system: str | None, where: str) -> None:
        """A custom template's TEMPLATE against the model's own rendering (ManifestError on a difference)."""
        if not self.expected:
            return
        mismatch = check_template(go_template, self.expected, system)
        if mismatch is not None:
            raise ManifestError(f"{where}: TEMPLATE does not render {_origin(self)}'s chat_template: "
                                f"{mismatch.describe()}; fix it, or set modelfile.unchecked_template to its name")


def _origin(setup: ChatSetup) -> str:
    return setup.model_chat.origin if setup.model_chat else "the model"


def _stops(builtin: BuiltinTemplate | None, chat: ModelChat | None) -> tuple[str, ...]:
    stops = list(builtin.end_of_turn if builtin else ())
    stops += list(chat.eos_tokens if chat else ())
    return tuple(dict.fromkeys(stops))


def _capabilities(chat: ModelChat) -> tuple[str, ...]:
    wanted = [("tools", chat.uses("tools")), ("thinking", chat.uses("enable_thinking") or "<think>" in chat.template)]
    return tuple(name for name, present in wanted if present)


def _check_system(chat: ModelChat, system: str | None) -> None:
    """A Modelfile SYSTEM goes into every conversation: refused when the model's template refuses a system
    message (Gemma 2's), though it renders the same conversation without one."""
    if system is None:
        return
    user = ({"role": "user", "content": PROMPT},)
    try:
        model_render(chat, user, system)
    except ModelError as e:
        try:
            model_render(chat, user, None)
        except ModelError:
            return  # it refuses more than the system message: the conversations report it
        raise ManifestError(f"modelfile.system: {chat.origin}'s chat_template refuses a system message "
                            f"({template_error(e)}), and Ollama adds the SYSTEM to every conversation; "
                            "leave modelfile.system out for this model") from None


def _model_renders(chat: ModelChat, system: str | None) -> tuple[tuple[ExpectedRender, ...], tuple[Refusal, ...]]:
    _check_system(chat, system)
    return expected_renders(chat, system)


def _no_match(chat: ModelChat, misses: list[tuple[str, Mismatch]]) -> ManifestError:
    name, mismatch = misses[0]
    return ManifestError(f"modelfile.template: auto: no built-in template renders {chat.origin}'s chat_template "
                         f"exactly (closest, {name}: {mismatch.describe()}); {HOW_TO_BRING}")


def resolve_chat(modelfile: Modelfile, model_dir: Path | None) -> ChatSetup:
    """The conversation setup for the model's files in `model_dir` (None: not on this machine yet; then `auto` is
    not known until they are, and a named template goes unchecked)."""
    chat = read_model_chat(model_dir) if model_dir is not None else None
    unchecked = modelfile.unchecked_template == modelfile.template
    if modelfile.template == AUTO:
        if model_dir is None:
            return ChatSetup(AUTO, None, (), known=False)
        if chat is None:
            raise ManifestError(f"modelfile.template: auto: {model_dir} has no chat template (tokenizer_config.json "
                                "chat_template or chat_template.jinja); name a built-in or a template file")
        expected, refused = _model_renders(chat, modelfile.system)
        if not expected:
            raise ManifestError(f"modelfile.template: auto: {chat.origin}'s chat_template refuses every fixed "
                                f"conversation ({refused[0].error}); {HOW_TO_BRING}")
        builtin, misses = choose_builtin(expected, modelfile.system)
        if builtin is None:
            raise _no_match(chat, misses)
        return ChatSetup(builtin.name, builtin, _stops(builtin, chat), expected, _capabilities(chat), chat,
                         refused=refused)
    builtin = BUILTINS.get(modelfile.template)
    expected, refused = _model_renders(chat, modelfile.system) if chat is not None and not unchecked else ((), ())
    setup = ChatSetup(modelfile.template, builtin, _stops(builtin, chat), expected,
                      _capabilities(chat) if chat is not None else (), chat, refused=refused)
    if builtin is not None:
        setup.check_custom(builtin.text, modelfile.system, f"modelfile.template: {builtin.name}")
    return setup
