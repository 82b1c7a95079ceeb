"""Which template Ollama renders a model with, what it says the model can do, and chat-template autodetection.

Follows the current ollama/ollama server:
- server/images.go GetModel: a model has a Go TEMPLATE when its manifest has a template (or prompt) layer, a chat
  template when its GGUF has `tokenizer.chat_template`; PreferChatTemplate is set by shouldPreferChatTemplate
  (chatTemplateCapabilities vs goTemplateCapabilities, goTemplateHasToolRoundTrip/chatTemplateHasToolRoundTrip)
  unless OLLAMA_GO_TEMPLATE is set, the config names a renderer or parser, or harmony applies.
- server/routes.go shouldUseGoTemplate / usesOllamaRenderedChat / chatModeForModel: a model is rendered by Ollama
  (Go TEMPLATE) or "native", i.e. by llama-server's Jinja chat template (see jinja.py).
- server/images.go Capabilities() for /api/show, server/model_list_cache.go buildModelListSummary for /api/tags.
- template/template.go Named and server/model.go detectChatTemplate: a GGUF import whose chat template is within
  Levenshtein distance 100 of a template of template/index.json gets that named template and its stop parameters.
  named_templates.json holds the whole index (so the nearest match is Ollama's) but the .gotmpl/.json data only of
  chatml, llama3-instruct, mistral-instruct, phi-3, gemma-instruct and gemma3-instruct (qwen2.5-instruct has none
  upstream). Detection runs on every GGUF import, a TEMPLATE sent with the create replacing the detected one.

The thinking capability of a Go template needs Go's parse tree (thinking.InferTags): gothink/main.go answers that.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.gotemplate import CACHE_ROOT, GoTemplates, TemplateError, build_go_program, source_hash
from tests.gotemplate.gofmt import go_json

from .common import ApiError
from .store import MEDIA, Layer, Store

NAMED_FILE = Path(__file__).with_name("named_templates.json")
GOTHINK_DIR = Path(__file__).with_name("gothink")
DEFAULT_TEMPLATE = "{{ .Prompt }}"  # template.DefaultTemplate
NAMED_THRESHOLD = 100  # template.Named: a match needs a distance below this


# --- chat-template autodetection (template/template.go, server/model.go) -----------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance over code points (agnivade/levenshtein, as Ollama uses it), with a bit-parallel column
    (Hyyrö's variant of Myers' algorithm): the templates are thousands of characters long."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    masks: dict[str, int] = {}
    for i, ch in enumerate(b):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full, top = (1 << len(b)) - 1, 1 << (len(b) - 1)
    plus, minus, score = full, 0, len(b)
    for ch in a:
        eq = masks.get(ch, 0)
        xv = eq | minus
        xh = (((eq & plus) + plus) ^ plus) | eq
        hplus = (minus | ~(xh | plus)) & full
        hminus = plus & xh
        if hplus & top:
            score += 1
        elif hminus & top:
            score -= 1
        hplus = ((hplus << 1) | 1) & full
        hminus = (hminus << 1) & full
        plus = (hminus | ~(xv | hplus)) & full
        minus = hplus & xv
    return score


@dataclass(frozen=True)
class Named:
    name: str
    template: str  # the Go template (.gotmpl, CRLF normalized to LF)
    parameters: dict | None  # the .json params as Ollama re-encodes them ({"stop": [...]}), None without a file


@functools.cache
def _named_data() -> dict:
    return json.loads(NAMED_FILE.read_text())


def detect_named(chat_template: str) -> Named | None:
    """template.Named: the index entry nearest to the GGUF's chat template (the first one on a tie), if its
    distance is below 100."""
    data = _named_data()
    best, score = None, None
    for entry in data["index"]:
        distance = levenshtein(chat_template, entry["template"])
        if score is None or distance < score:
            best, score = entry["name"], distance
    if best is None or score >= NAMED_THRESHOLD:
        return None
    if best not in data["named"]:
        raise ApiError(500, f"the test server has no data for Ollama's named template {best!r} "
                            f"(add it to {NAMED_FILE.name})")
    named = data["named"][best]
    return Named(best, named["gotmpl"], named["parameters"])


def autodetected_layers(store: Store, kv: dict) -> list[Layer]:
    """detectChatTemplate for an imported GGUF: the named template's layer (its status line says which
    template) and, when the template has a params file, a params layer as Go's json.Encoder writes it."""
    chat = kv.get("tokenizer.chat_template")
    named = detect_named(chat) if isinstance(chat, str) and chat else None
    if named is None:
        return []
    template = store.bytes_layer(named.template.encode(), MEDIA + "template")
    template.status = f"using autodetected template {named.name}"
    layers = [template]
    if named.parameters is not None:
        data = go_json({"stop": named.parameters.get("stop")}, sort_keys=False) + "\n"
        layers.append(store.bytes_layer(data.encode(), MEDIA + "params"))
    return layers


# --- capabilities of a GGUF chat template (server/images.go) -----------------------------------------------

def chat_template_has_tools(text: str) -> bool:
    return "tools" in text or "tool_call" in text


def chat_template_has_tool_round_trip(text: str) -> bool:
    if not chat_template_has_tools(text) or not ("tool_calls" in text or "assistant_tool_call" in text):
        return False
    markers = ("tool_response", "tool_results", "role'] == 'tool'", "role'] == \"tool\"", "role\"] == 'tool'",
               "role\"] == \"tool\"", "message.role == 'tool'", "message.role == \"tool\"", "ipython")
    return any(m in text for m in markers)


def chat_template_has_thinking(text: str) -> bool:
    if "<think>" in text and "</think>" in text:
        return True
    splits = "content.split('</think>')" in text or 'content.split("</think>")' in text
    return splits and "reasoning_content" not in text and "<SPECIAL_12>" not in text


def chat_template_capabilities(text: str) -> list[str]:
    if not text:
        return []
    return [cap for cap, has in (("tools", chat_template_has_tools(text)),
                                 ("thinking", chat_template_has_thinking(text))) if has]


# --- capabilities of a Go TEMPLATE (server/images.go, thinking/template.go) --------------------------------

def ensure_gothink() -> Path:
    """The gothink binary, built when missing (see gotemplate.build_go_program)."""
    digest = source_hash(GOTHINK_DIR, ("go.mod", "main.go"))
    return build_go_program(GOTHINK_DIR, CACHE_ROOT / f"gothink-{digest}" / "gothink")


@functools.lru_cache(maxsize=256)
def think_tags(template: str) -> tuple[str, str]:
    """thinking.InferTags of a Go template: its (opening, closing) thinking tags, ("", "") when none."""
    done = subprocess.run([str(ensure_gothink())], input=json.dumps({"template": template}).encode(),
                          capture_output=True, timeout=60)
    answer = json.loads(done.stdout or b"{}")
    if done.returncode != 0 or "error" in answer:
        raise TemplateError(answer.get("error") or done.stderr.decode(errors="replace"))
    return answer["open"], answer["close"]


@dataclass(frozen=True)
class GoFacts:
    """What Ollama reads from a parsed Go TEMPLATE; `ok` is False when it does not parse (Vars fails)."""

    raw: str
    vars: tuple[str, ...]
    think: tuple[str, str]
    ok: bool = True

    @classmethod
    def of(cls, go: GoTemplates, raw: str) -> GoFacts:
        try:
            return cls(raw, tuple(go.parse(raw)), think_tags(raw))
        except TemplateError:
            return cls(raw, (), ("", ""), ok=False)

    def capabilities(self) -> list[str]:
        """goTemplateCapabilities: tools (.Tools), insert (.Suffix), thinking (inferred tags)."""
        if not self.ok:
            return []
        caps = [cap for var, cap in (("tools", "tools"), ("suffix", "insert")) if var in self.vars]
        return caps + (["thinking"] if all(self.think) else [])

    def has_tool_round_trip(self) -> bool:
        """goTemplateHasToolRoundTrip: .Tools and .ToolCalls, and a way to show tool results."""
        return (self.ok and "tools" in self.vars and "toolcalls" in self.vars
                and any(m in self.raw for m in ('eq .Role "tool"', "tool_response", "TOOL_RESULTS")))


def should_prefer_chat_template(chat_template: str, chat_caps: list[str], go: GoFacts, go_caps: list[str]) -> bool:
    if len(chat_caps) > len(go_caps):  # hasMoreCapabilities
        return not go.has_tool_round_trip() or chat_template_has_tool_round_trip(chat_template)
    if sorted(chat_caps) != sorted(go_caps) or "tools" not in chat_caps or "tools" not in go_caps:
        return False
    return chat_template_has_tool_round_trip(chat_template) and not go.has_tool_round_trip()


def go_template_env() -> bool | None:
    """OLLAMA_GO_TEMPLATE (envconfig.BoolWithDefault): None when unset, else its value (unparsable is true)."""
    value = os.environ.get("OLLAMA_GO_TEMPLATE", "").strip().strip("\"'")
    if not value:
        return None
    return value not in ("0", "f", "F", "false", "FALSE", "False")


# --- the selection for one model -------------------------------------------------------------------------

def _add(caps: list[str], *more: str) -> None:
    for cap in more:
        if cap and cap not in caps:
            caps.append(cap)


@dataclass
class TemplateChoice:
    """GetModel's template flags for one stored model and what follows from them."""

    go: GoFacts  # the Go TEMPLATE, or DefaultTemplate when the manifest has none
    has_go: bool  # HasGoTemplate
    chat_template: str  # tokenizer.chat_template of the GGUF ("" when none)
    config: dict
    kv: dict  # the GGUF's key/values
    prefer_chat: bool = False  # PreferChatTemplate
    uses_go: bool = False  # shouldUseGoTemplate
    rendered: bool = True  # usesOllamaRenderedChat: Ollama renders the prompt; else llama-server's Jinja does

    @classmethod
    def of(cls, go: GoTemplates, template: str | None, config: dict, kv: dict) -> TemplateChoice:
        chat = kv.get("tokenizer.chat_template")
        choice = cls(GoFacts.of(go, DEFAULT_TEMPLATE if template is None else template), template is not None,
                     chat if isinstance(chat, str) else "", config, kv)
        renderer, parser = config.get("renderer") or "", config.get("parser") or ""
        harmony = choice.is_gptoss and "<|start|>" in choice.go.raw and "<|end|>" in choice.go.raw
        env = go_template_env()
        if (env is None and choice.has_go and choice.chat_template and not renderer and not parser and not harmony
                and should_prefer_chat_template(choice.chat_template, chat_template_capabilities(choice.chat_template),
                                                choice.go, choice.go.capabilities())):
            choice.prefer_chat = True
        go_on = True if env is None else env
        choice.uses_go = choice.has_go and go_on and not choice.prefer_chat
        choice.rendered = bool(renderer or parser or harmony or choice.uses_go)
        return choice

    @property
    def is_gptoss(self) -> bool:
        return self.config.get("model_family") in ("gptoss", "gpt-oss")

    @property
    def native(self) -> bool:
        """chatModeForModel == chatExecutionModeNative: llama-server applies the GGUF's Jinja chat template."""
        return not self.rendered

    @property
    def jinja(self) -> bool:
        """The GGUF's chat template renders chat and generate prompts (/api/generate needs one in the GGUF)."""
        return self.native and bool(self.chat_template)

    def show_template(self) -> str:
        """selectedModelTemplate: the Jinja text when it is what renders, else the Go TEMPLATE."""
        return self.chat_template if self.jinja else self.go.raw

    def _arch_key(self, key: str) -> bool:
        return f"{self.kv.get('general.architecture') or ''}.{key}" in self.kv

    def capabilities(self) -> list[str]:
        """Model.Capabilities for /api/show, chat and generate (no projectors or built-in parsers here)."""
        caps: list[str] = []
        _add(caps, *(self.config.get("capabilities") or []))
        if self.native:
            _add(caps, *chat_template_capabilities(self.chat_template))
        _add(caps, "embedding" if self._arch_key("pooling_type") else "completion")
        _add(caps, *(cap for key, cap in (("vision.block_count", "vision"), ("audio.block_count", "audio"))
                     if self._arch_key(key)))
        if not (self.has_go and not self.uses_go):
            _add(caps, *self.go.capabilities())
        if self.is_gptoss:
            _add(caps, "thinking")
        return caps

    def list_capabilities(self, gguf: bool = True) -> list[str]:
        """buildModelListSummary for /api/tags: the GGUF header up to the tokenizer keys (unless it could not be
        read), the config, then the Go TEMPLATE's variables and thinking tags (never the GGUF's chat template)."""
        caps: list[str] = []
        arch, pooling = "", False
        for key in self.kv if gguf else ():
            if key == "general.architecture":
                arch = str(self.kv[key])
            elif arch and key.startswith("tokenizer."):
                break
            elif arch and key.startswith(arch + "."):
                suffix = key[len(arch) + 1:]
                pooling = pooling or suffix == "pooling_type"
                _add(caps, {"vision.block_count": "vision", "audio.block_count": "audio"}.get(suffix, ""))
        if gguf:
            _add(caps, "embedding" if pooling else "completion")
        _add(caps, *(self.config.get("capabilities") or []))
        go_caps = self.go.capabilities()
        _add(caps, *(cap for cap in go_caps if cap != "thinking"))
        if "thinking" in go_caps or self.is_gptoss:
            _add(caps, "thinking")
        return caps
