"""POST /api/generate and /api/chat (GenerateHandler, ChatHandler and handleNativeChat in server/routes.go).

The prompt is Ollama's Go TEMPLATE rendering (Go's text/template via tests/gotemplate) unless the model is
"native" (templates.TemplateChoice): then it is the GGUF's Jinja chat template as llama-server applies it
(jinja.py). `_debug_render_only` answers with that prompt instead of generating, after the model was loaded:
{"model", "created_at", "message": {"role": "", "content": ""} (chat) or "response": "" (generate),
"done": false, "_debug_info": {"rendered_template": PROMPT, "image_count": N (left out when 0)}}.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tests.gotemplate import TemplateError
from tests.gotemplate.gofmt import quote

from . import jinja
from .common import ApiError, now_go
from .generation import Loaded, Options, canned_pieces, generate_pieces
from .names import parse_keep_alive

if TYPE_CHECKING:
    from .api import ModelView
    from .templates import TemplateChoice


def _render_accepts(render, name: str) -> bool:
    """Whether GoTemplates.render takes this keyword (tools and think arrive with a newer helper)."""
    try:
        return name in inspect.signature(render).parameters
    except (TypeError, ValueError):
        return False


def _image_count(messages: list[dict]) -> int:
    return sum(len(m.get("images") or []) for m in messages)


def tag_images(messages: list[dict], renderer: str) -> tuple[list[dict], int]:
    """imageTaggedMessages (server/prompt.go): each image of a message becomes an [img-N] marker, put where the
    content says [img] or else before it (not with a renderer); returns the messages and the image count."""
    out, count = [], 0
    for message in messages:
        prefix, content = "", message.get("content") or ""
        for _ in message.get("images") or []:
            tag, count = f"[img-{count}]", count + 1
            if "[img]" in content:
                content = content.replace("[img]", tag, 1)
            else:
                prefix += tag
        out.append(message if renderer or not message.get("images") else {**message, "content": prefix + content})
    return out, count


class GenerateEndpoints:
    """The generate and chat half of App (api.py): it brings find, choice, models, templates, faults."""

    def generate(self, req: dict, chat: bool) -> Iterator[dict] | dict:
        raw = req.get("model") or ""
        keep_alive = parse_keep_alive(req.get("keep_alive"))
        model = self.find(raw, f"model '{raw}' not found")
        messages = req.get("messages") or []
        prompt_given = bool(messages) if chat else bool(req.get("prompt"))
        if self.faults["fail_generate"]:
            raise ApiError(500, "injected failure")
        if delay := self.faults["generate_delay_s"]:
            time.sleep(float(delay))
        if not prompt_given and req.get("keep_alive") is not None and keep_alive == 0:
            self.models.unload(model.name)  # Ollama: an empty request with keep_alive 0 unloads the model
            return self._final(raw, chat, "unload", "", {}, 0, 0)
        if not chat and req.get("raw") and (req.get("template") or req.get("system") or req.get("context")):
            raise ApiError(400, "raw mode does not support template, system, or context")
        choice = self.choice(model)
        think = self._check_capabilities(req, chat, model, choice)
        opts = Options.build(model.params, req.get("options"))
        if opts.seed < 0 and self.default_seed >= 0:
            opts.seed = self.default_seed
        canned = self.faults["generate_response"]
        if canned is not None and prompt_given:
            loaded, load_ns = None, 0
        else:
            loaded, load_ns = self.models.load(model, opts, keep_alive)
        if not prompt_given:  # an empty request only loads the model
            return self._final(raw, chat, "load", "", {}, load_ns, load_ns)
        prompt, images = self._prompt(model, choice, req, chat, loaded, think)
        prompt += self.faults["prompt_suffix"]
        if req.get("_debug_render_only") and not self.faults["ignore_debug_render"]:
            if keep_alive == 0:  # the runner expires once the request is done, as after a generation
                self.models.unload(model.name)
            info = {"rendered_template": prompt, **({"image_count": images} if images else {})}
            body = {"message": {"role": "", "content": ""}} if chat else {"response": ""}
            return {"model": raw, "created_at": now_go(), **body, "done": False, "_debug_info": info}
        stats: dict = {}
        start = time.perf_counter_ns()
        if loaded is None:
            pieces = canned_pieces(str(canned), prompt, self.faults["generate_tokens_per_second"], stats)
        else:
            pieces = generate_pieces(loaded, prompt, opts, stats)
        return self._generate_events(raw, model.name, chat, req.get("stream") is not False, pieces, stats,
                                     start, load_ns, keep_alive)

    def _check_capabilities(self, req: dict, chat: bool, model: ModelView, choice: TemplateChoice) -> object:
        """The capabilities a request needs (Model.CheckCapabilities via scheduleRunner) and its think value:
        a thinking model thinks unless told not to; asking a model without thinking to think is a 400."""
        caps = choice.capabilities()
        think = req.get("think")
        if "thinking" in caps:
            think = True if think is None else think
        elif jinja.think_bool(think):
            raise ApiError(400, f"{quote(req.get('model') or '')} does not support thinking")
        wanted = ["completion", *(["tools"] if chat and req.get("tools") else []),
                  *(["insert"] if not chat and req.get("suffix") else [])]
        missing = [cap for cap in wanted if cap not in caps]
        if "completion" in missing:
            raise ApiError(400, f"{quote(req.get('model') or '')} does not support {'chat' if chat else 'generate'}")
        if missing:
            n = model.name
            raise ApiError(400, f"{n.host}/{n.namespace}/{n.model}:{n.tag} does not support " + "\n".join(missing))
        return think

    def _prompt(self, model: ModelView, choice: TemplateChoice, req: dict, chat: bool, loaded: Loaded | None,
                think: object) -> tuple[str, int]:
        """The prompt and the number of images, as Ollama builds them: the model's SYSTEM unless the request
        brings its own, the model's MESSAGE history, the request's messages; through the Go TEMPLATE or the
        GGUF's chat template."""
        tools = req.get("tools") or []
        if chat:
            messages = [*model.messages, *req["messages"]]
            if req["messages"][0].get("role") != "system" and model.system:
                messages.insert(0, {"role": "system", "content": model.system})
            if choice.native:  # handleNativeChat: with or without a chat template (llama.cpp's ChatML then)
                return self._jinja(model, choice, messages, tools, think, loaded), _image_count(messages)
            tagged, images = tag_images(messages, model.config.get("renderer") or "")
            return self._go(choice.go.raw, tagged, "", "", tools, think), images
        images = len(req.get("images") or [])
        if req.get("raw"):
            return req["prompt"], images
        system = req.get("system") or model.system
        messages = [{"role": "system", "content": system}] if system else []
        if req.get("context") is None:
            messages += model.messages
        messages.append({"role": "user", "content": req["prompt"], **({"images": req["images"]} if images else {})})
        suffix = req.get("suffix") or ""
        if suffix:  # a fill-in-the-middle prompt: the template gets Prompt and Suffix
            rendered = self._go(req.get("template") or choice.go.raw, [], req["prompt"], suffix, [], think)
        elif req.get("template"):  # a request's own template runs directly, on untagged messages
            rendered = self._go(req["template"], messages, "", "", [], think)
        elif choice.jinja:
            rendered = self._jinja(model, choice, tag_images(messages, "")[0], [], think, loaded)
        else:
            rendered = self._go(choice.go.raw, tag_images(messages, model.config.get("renderer") or "")[0], "", "",
                                [], think)
        if req.get("context") and loaded is not None:  # the deprecated context goes first
            rendered = loaded.llm.detokenize(req["context"], special=True).decode("utf-8", "replace") + rendered
        return rendered, images

    def _go(self, template: str, messages: list[dict], prompt: str, suffix: str, tools: list, think: object) -> str:
        render = self.templates.render
        extra: dict = {}
        if tools and _render_accepts(render, "tools"):
            extra["tools"] = tools
        if think is not None and _render_accepts(render, "think"):
            extra["think"] = think
        try:
            return render(template, messages, prompt=prompt, suffix=suffix, **extra)
        except TemplateError as exc:
            raise ApiError(500, str(exc)) from None

    def _jinja(self, model: ModelView, choice: TemplateChoice, messages: list[dict], tools: list, think: object,
               loaded: Loaded | None) -> str:
        vocab = jinja.gguf_vocab_strings(model.path, loaded.llm if loaded is not None else None)
        try:
            return jinja.render(choice.chat_template, messages, tools=tools, think=think, vocab=vocab)
        except jinja.JinjaError as exc:
            raise ApiError(500, str(exc)) from None

    def _generate_events(self, raw, name, chat, stream, pieces, stats, start, load_ns, keep_alive) -> Iterator[dict]:
        text = []
        for piece in pieces:
            text.append(piece)
            if stream:
                yield self._chunk(raw, chat, piece)
        if keep_alive == 0:
            self.models.unload(name)
        yield self._final(raw, chat, stats["done_reason"], "" if stream else "".join(text), stats, load_ns,
                          time.perf_counter_ns() - start + load_ns)

    @staticmethod
    def _chunk(raw: str, chat: bool, text: str, **extra) -> dict:
        body = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
        return {"model": raw, "created_at": now_go(), **body, "done": False, **extra}

    def _final(self, raw, chat, reason, text, stats, load_ns, total_ns) -> dict:
        timing = {"total_duration": max(total_ns, 1), "load_duration": load_ns}
        if stats:
            timing.update({k: stats[k] for k in ("prompt_eval_count", "prompt_eval_duration", "eval_count",
                                                 "eval_duration")})
            if not chat:
                timing["context"] = stats["context"]
        final = self._chunk(raw, chat, text, done_reason=reason, **timing)
        final["done"] = True
        return final
