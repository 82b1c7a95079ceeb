"""Render each variant's Modelfile from a Jinja template, and derive the Ollama create request from it.

A built-in chat template renders through templates/modelfile.j2; a custom .j2 writes the whole Modelfile
and its TEMPLATE is checked against the model's own chat template (chat.setup). The rendered Modelfile is
parsed back with Ollama's own rules and the parse is what gets registered, so the file a person reads (and
could `ollama create -f`) and the model on the hosts cannot drift apart. Templates run in Jinja's sandbox
with StrictUndefined: a typo in a custom template is an error, not an empty string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from ..builtin_templates import TEMPLATE_DIR
from ..chat.setup import ChatSetup
from ..errors import ManifestError
from ..manifest.modelfile import Command, ModelfileSyntaxError, parse_modelfile, quote
from ..manifest.schema import OLLAMA_OPTION_TYPES, Modelfile

BUILTIN_MODELFILE = "modelfile.j2"


@dataclass(frozen=True)
class RenderedModel:
    """What one tag is: its GGUF plus the Modelfile's template, system prompt and parameters."""

    text: str  # the Modelfile, as written next to the GGUF
    gguf: Path
    template: str
    system: str | None
    parameters: dict[str, Any] = field(default_factory=dict)


def _template_source(modelfile: Modelfile) -> tuple[Path, str]:
    if modelfile.template.endswith(".j2"):
        path = Path(modelfile.template)
        return path.parent, path.name
    return TEMPLATE_DIR, BUILTIN_MODELFILE


def _parameter_items(parameters: dict[str, Any]) -> list[tuple[str, Any]]:
    """(key, value) lines in a stable order, one per list element; stops come separately (see _stops)."""
    items = []
    for key in sorted(k for k in parameters if k != "stop"):
        values = parameters[key] if isinstance(parameters[key], list) else [parameters[key]]
        items += [(key, value) for value in values]
    return items


def _typed_parameters(commands: list[Command]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for command in commands:
        kind = OLLAMA_OPTION_TYPES.get(command.name)
        if kind is None:
            continue
        if kind is list:
            out.setdefault(command.name, []).append(command.args)
        elif kind is bool:
            out[command.name] = command.args.lower() == "true"
        else:
            out[command.name] = kind(command.args)
    return out


def _stops(modelfile: Modelfile, chat: ChatSetup) -> list[str]:
    """The template's and the model's stop tokens, then any the manifest adds, each once."""
    return list(dict.fromkeys([*chat.stops, *modelfile.parameters.get("stop", [])]))


def render_modelfile(modelfile: Modelfile, gguf: Path, chat: ChatSetup) -> RenderedModel:
    """Render the Modelfile for one GGUF (referenced as ./<file name>, next to it)."""
    directory, name = _template_source(modelfile)
    env = SandboxedEnvironment(loader=jinja2.FileSystemLoader(str(directory)), undefined=jinja2.StrictUndefined,
                               keep_trailing_newline=True, autoescape=False)
    env.globals["quote"] = quote
    context = {"gguf_file": gguf.name, "system": modelfile.system, "stops": _stops(modelfile, chat),
               "chat_template": chat.builtin.text if chat.builtin else "",
               "parameters": _parameter_items(modelfile.effective_parameters)}
    where = directory / name
    try:
        text = env.get_template(name).render(**context)
        if not text.endswith("\n"):
            text += "\n"
        commands = parse_modelfile(text)
    except jinja2.TemplateError as e:
        raise ManifestError(f"{where}: template error: {e}") from e
    except ModelfileSyntaxError as e:
        raise ManifestError(f"{where}: would render an invalid Modelfile: {e}") from e
    by_name = {c.name: c.args for c in commands}
    if "template" not in by_name:
        raise ManifestError(f"{where}: the Modelfile has no TEMPLATE; a chat template must be sent explicitly")
    if chat.builtin is None:
        chat.check_custom(by_name["template"], by_name.get("system"), str(where))
    return RenderedModel(text=text, gguf=gguf, template=by_name["template"], system=by_name.get("system"),
                         parameters=_typed_parameters(commands))
