"""The Ollama test server's templates, as current Ollama handles them: `_debug_render_only`, capabilities in
/api/show and /api/tags, the GGUF's Jinja chat template preferred over a Go TEMPLATE that can do less, and the
chat-template autodetection of a GGUF import (server/images.go, server/routes.go, server/model.go,
template/template.go of ollama/ollama)."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests import test_ollama_server as base
from tests.gotemplate import GoTemplates
from tests.ollama_server import ServerPool
from tests.ollama_server.templates import TemplateChoice, levenshtein
from tests.test_ollama_server import MESSAGES_TEMPLATE, PHI3_TEMPLATE, TIMEOUT, TURNS, TURNS_PROMPT, upload

tiny_gguf = base.tiny_gguf  # that module's fixture: the tiny Phi-3 GGUF

# A Go template that can do tools and thinking: .Tools, .Think, and .Thinking between text tags inside a range
# over .Messages (what thinking.InferTags looks for).
TOOLS_THINK_TEMPLATE = """{{- if .Tools }}<tools>{{ json .Tools }}</tools>
{{ end }}{{ if .Think }}<think_on>
{{ end }}{{- range .Messages }}<|{{ .Role }}|>
{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""
# A Jinja chat template that mentions tools (so Ollama reads a tools capability from it) and renders unlike
# MESSAGES_TEMPLATE, so a test can tell which of the two rendered.
TOOLS_JINJA = ("{% if tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]\n{% endif %}"
               "{% for message in messages %}[{{ message['role'] | upper }}] {{ message['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}]
# Ollama's template/chatml.gotmpl and template/chatml.json, and the GGUF chat template of one chatml entry of
# template/index.json (the one of many ChatML models).
CHATML_GOTMPL = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")
CHATML_STOPS = ["<|im_start|>", "<|im_end|>"]
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")


# --- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_chat_template(tiny_gguf, tmp_path_factory):
    """with_chat_template(text) -> a copy of the tiny GGUF whose tokenizer.chat_template is `text`, written by the
    gguf package's own metadata tool."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("chat-templates")

    def build(text: str) -> Path:
        if text not in made:
            out = root / f"{len(made)}.gguf"
            source = root / f"{len(made)}.jinja"
            source.write_text(text)
            subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(tiny_gguf), str(out),
                            "--chat-template-file", str(source), "--force"], check=True, capture_output=True)
            made[text] = out
        return made[text]

    return build


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    servers = ServerPool(tmp_path_factory.mktemp("ollama-templates"))
    yield servers.start(1)[0]
    servers.stop_all()


@pytest.fixture(scope="module")
def go_templates():
    templates = GoTemplates()
    yield templates
    templates.close()


def create(url: str, gguf: Path, name: str, **body) -> list[str]:
    """A non-streamed create (raising on failure); returns the status lines of the same create streamed."""
    body = {"model": name, "files": {"model.gguf": upload(url, gguf)}, **body}
    with httpx.stream("POST", f"{url}/api/create", json=body, timeout=TIMEOUT) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines and lines[-1] == {"status": "success"}, lines
    return [line["status"] for line in lines]


def post(url: str, path: str, body: dict, status: int = 200) -> dict:
    r = httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    return r.json()


def show(url: str, name: str) -> dict:
    return post(url, "/api/show", {"model": name})


def listed(url: str, name: str) -> dict:
    return next(m for m in httpx.get(f"{url}/api/tags", timeout=TIMEOUT).json()["models"] if m["name"] == name)


def running(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(f"{url}/api/ps", timeout=TIMEOUT).json()["models"]]


def debug_chat(url: str, name: str, messages: list[dict], **extra) -> dict:
    return post(url, "/api/chat", {"model": name, "messages": messages, "_debug_render_only": True, **extra})


# --- _debug_render_only ----------------------------------------------------------------------------------

@pytest.mark.llamacpp
def test_debug_render_returns_the_go_rendering_without_generating(url, tiny_gguf, go_templates):
    create(url, tiny_gguf, "t-debug", template=MESSAGES_TEMPLATE, system="Be brief.")
    answer = debug_chat(url, "t-debug", TURNS)
    assert set(answer) == {"model", "created_at", "message", "done", "_debug_info"}  # no metrics: nothing ran
    assert answer["model"] == "t-debug" and answer["done"] is False
    assert answer["message"] == {"role": "", "content": ""}
    assert answer["_debug_info"] == {"rendered_template": go_templates.render(MESSAGES_TEMPLATE, TURNS)}
    assert answer["_debug_info"]["rendered_template"] == TURNS_PROMPT  # the request's system wins over SYSTEM

    # One JSON object even when streaming is asked for; the model's SYSTEM when the request has none.
    r = httpx.post(f"{url}/api/chat", json={"model": "t-debug", "messages": TURNS[1:], "_debug_render_only": True},
                   timeout=TIMEOUT)
    assert r.headers["content-type"].startswith("application/json")
    expected = go_templates.render(MESSAGES_TEMPLATE, [{"role": "system", "content": "Be brief."}, *TURNS[1:]])
    assert r.json()["_debug_info"]["rendered_template"] == expected

    # Images are counted (image_count appears only when there are any) and tagged [img-N] in the content.
    pic = {"role": "user", "content": "What is this?", "images": ["aGVsbG8="]}
    info = debug_chat(url, "t-debug", [pic])["_debug_info"]
    assert info["image_count"] == 1 and "<|user|>\n[img-0]What is this?<|end|>" in info["rendered_template"]

    gen = post(url, "/api/generate", {"model": "t-debug", "prompt": "Hi", "_debug_render_only": True})
    assert set(gen) == {"model", "created_at", "response", "done", "_debug_info"} and gen["response"] == ""
    assert gen["_debug_info"] == {"rendered_template": go_templates.render(
        MESSAGES_TEMPLATE, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])}
    assert "t-debug:latest" in running(url)  # the model was loaded, as Ollama schedules a runner first
    debug_chat(url, "t-debug", TURNS, keep_alive=0)
    assert "t-debug:latest" not in running(url)


# --- capabilities ------------------------------------------------------------------------------------------

@pytest.mark.llamacpp
def test_capabilities_come_from_the_go_template(url, tiny_gguf):
    create(url, tiny_gguf, "t-caps", template=TOOLS_THINK_TEMPLATE)
    create(url, tiny_gguf, "t-insert", template="{{ .Prompt }}<fim>{{ .Suffix }}")
    create(url, tiny_gguf, "t-plain", template=PHI3_TEMPLATE)
    for name, caps in (("t-caps", ["completion", "tools", "thinking"]), ("t-insert", ["completion", "insert"]),
                       ("t-plain", ["completion"])):
        assert show(url, name)["capabilities"] == caps, name
        assert listed(url, f"{name}:latest")["capabilities"] == caps, name
        assert show(url, name)["template"] != TOOLS_JINJA

    # A thinking model thinks by default; one without thinking refuses think, one without tools refuses tools.
    answer = debug_chat(url, "t-caps", [{"role": "user", "content": "hi"}])
    if "think" in inspect.signature(GoTemplates.render).parameters:  # a helper that passes .Think and .Tools
        assert "<think_on>" in answer["_debug_info"]["rendered_template"]
        off = debug_chat(url, "t-caps", [{"role": "user", "content": "hi"}], think=False, tools=TOOLS)
        rendered = off["_debug_info"]["rendered_template"]
        assert "<think_on>" not in rendered and rendered.startswith("<tools>[{") and "get_weather" in rendered
    error = post(url, "/api/chat", {"model": "t-plain", "messages": [{"role": "user", "content": "hi"}],
                                    "think": True}, status=400)
    assert error == {"error": '"t-plain" does not support thinking'}
    error = post(url, "/api/chat", {"model": "t-plain", "messages": [{"role": "user", "content": "hi"}],
                                    "tools": TOOLS}, status=400)
    assert error == {"error": "registry.ollama.ai/library/t-plain:latest does not support tools"}
    error = post(url, "/api/generate", {"model": "t-plain", "prompt": "a", "suffix": "b"}, status=400)
    assert error == {"error": "registry.ollama.ai/library/t-plain:latest does not support insert"}


def test_template_selection_follows_ollama(go_templates, monkeypatch):
    """shouldPreferChatTemplate and shouldUseGoTemplate, without a server."""
    monkeypatch.delenv("OLLAMA_GO_TEMPLATE", raising=False)
    kv = {"general.architecture": "phi3", "tokenizer.chat_template": TOOLS_JINJA}

    def choose(template, chat=TOOLS_JINJA, **config):
        return TemplateChoice.of(go_templates, template, config, {**kv, "tokenizer.chat_template": chat})

    assert choose(MESSAGES_TEMPLATE).jinja  # the chat template can do more (tools)
    assert choose(None).jinja and choose(None, chat="").native and not choose(None, chat="").jinja
    assert not choose(TOOLS_THINK_TEMPLATE).native  # the Go template can do as much or more
    assert not choose(MESSAGES_TEMPLATE, renderer="x").native  # a renderer or parser means Ollama renders
    # Same capabilities, both with tools: the chat template wins only with a tool round trip the Go one lacks.
    round_trip = ("{% for m in messages %}{{ m.tool_calls }}{% if m.role == 'tool' %}<tool_response>{% endif %}"
                  "{% endfor %}")
    go_tools = "{{ range .Messages }}{{ .Content }}{{ end }}{{ .Tools }}"
    go_round_trip = '{{ range .Messages }}{{ .ToolCalls }}{{ if eq .Role "tool" }}R{{ end }}{{ end }}{{ .Tools }}'
    assert choose(go_tools, chat=round_trip).jinja and not choose(go_round_trip, chat=round_trip).native
    assert choose(go_tools, chat=round_trip).capabilities() == ["tools", "completion"]
    monkeypatch.setenv("OLLAMA_GO_TEMPLATE", "1")
    assert not choose(MESSAGES_TEMPLATE).native  # set at all: no preference
    monkeypatch.setenv("OLLAMA_GO_TEMPLATE", "false")
    assert choose(MESSAGES_TEMPLATE).jinja and choose(TOOLS_THINK_TEMPLATE).jinja
    assert choose(TOOLS_THINK_TEMPLATE).capabilities() == ["tools", "completion"]


def test_qwen3s_chat_template_renders_unless_the_go_template_has_thinking_tags(go_templates, monkeypatch):
    """Qwen3's own template has tools and thinking. Ollama keeps the qwen3 built-in, whose thinking tags it infers
    (thinking.InferTags: .Thinking between text tags in the range over .Messages), and prefers the Jinja over a Go
    template without them: the Qwen2.5 built-in (tools only), or the qwen3 one with the tags taken out."""
    from so8t_deploy.builtin_templates import BUILTINS
    from so8t_deploy.external.llamacpp import locate_llama_cpp_models

    monkeypatch.delenv("OLLAMA_GO_TEMPLATE", raising=False)
    name = "templates/Qwen-Qwen3-0.6B.jinja"
    kv = {"general.architecture": "qwen3",
          "tokenizer.chat_template": locate_llama_cpp_models([name])[name].read_text(encoding="utf-8")}
    qwen3 = BUILTINS["qwen3"].text
    kept = TemplateChoice.of(go_templates, qwen3, {}, kv)
    assert not kept.native and kept.capabilities() == ["completion", "tools", "thinking"]
    assert TemplateChoice.of(go_templates, BUILTINS["qwen2.5"].text, {}, kv).jinja
    untagged = qwen3.replace("<think>\n{{ .Thinking }}\n</think>", "{{ .Thinking }}")
    assert untagged != qwen3 and TemplateChoice.of(go_templates, untagged, {}, kv).jinja


# --- the GGUF's Jinja chat template --------------------------------------------------------------------------

def hf_render(template: str, messages: list[dict], tools: list | None = None) -> str:
    """The oracle: transformers' own chat-template rendering."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template, add_generation_prompt=True,
                                        bos_token="<s>", eos_token="<|endoftext|>")
    return rendered[0]


@pytest.mark.llamacpp
def test_a_chat_template_with_tools_renders_instead_of_the_go_template(url, with_chat_template, go_templates):
    gguf = with_chat_template(TOOLS_JINJA)
    create(url, gguf, "t-jinja", template=MESSAGES_TEMPLATE)
    info = show(url, "t-jinja")
    assert info["template"] == TOOLS_JINJA  # selectedModelTemplate; the Modelfile keeps the TEMPLATE sent
    assert f'TEMPLATE "{MESSAGES_TEMPLATE}"' in info["modelfile"]
    assert info["capabilities"] == ["tools", "completion"]  # chatTemplateCapabilities first, then the GGUF's
    assert listed(url, "t-jinja:latest")["capabilities"] == ["completion"]  # the list never reads the chat template
    assert "tokenizer.chat_template" not in info["model_info"]

    rendered = debug_chat(url, "t-jinja", TURNS)["_debug_info"]["rendered_template"]
    assert rendered == hf_render(TOOLS_JINJA, TURNS) != go_templates.render(MESSAGES_TEMPLATE, TURNS)
    assert rendered.startswith("[SYSTEM] S\n[USER] A\n") and rendered.endswith("[USER] C\n[ASSISTANT]")
    with_tools = debug_chat(url, "t-jinja", TURNS, tools=TOOLS)["_debug_info"]["rendered_template"]
    assert with_tools == hf_render(TOOLS_JINJA, TURNS, TOOLS) and with_tools.startswith("[TOOLS][{")
    generated = post(url, "/api/generate", {"model": "t-jinja", "prompt": "C", "system": "S",
                                             "_debug_render_only": True})
    assert generated["_debug_info"]["rendered_template"] == debug_chat(
        url, "t-jinja", [TURNS[0], TURNS[3]])["_debug_info"]["rendered_template"]  # generate renders like chat

    # Chat on the Jinja prompt: the same tokens in as a raw generate of that prompt.
    options = {"num_predict": 4, "seed": 3, "top_k": 1}
    chat = post(url, "/api/chat", {"model": "t-jinja", "messages": TURNS, "stream": False, "options": options})
    raw = post(url, "/api/generate", {"model": "t-jinja", "prompt": rendered, "raw": True, "stream": False,
                                      "options": options})
    assert chat["prompt_eval_count"] == raw["prompt_eval_count"] and chat["message"]["content"] == raw["response"]

    # Without a TEMPLATE the chat template renders too; with a Go TEMPLATE that can do tools, the Go one.
    create(url, gguf, "t-jinja-only")
    assert show(url, "t-jinja-only")["template"] == TOOLS_JINJA
    create(url, gguf, "t-go-tools", template=TOOLS_THINK_TEMPLATE)
    assert show(url, "t-go-tools")["template"] == TOOLS_THINK_TEMPLATE
    assert show(url, "t-go-tools")["capabilities"] == ["completion", "tools", "thinking"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("setting", ["1", "0"])
def test_ollama_go_template_decides(setting, pool, with_chat_template, monkeypatch):
    """OLLAMA_GO_TEMPLATE set: no preference for the chat template; 0 turns the Go TEMPLATE off altogether."""
    monkeypatch.setenv("OLLAMA_GO_TEMPLATE", setting)
    [host] = pool.start(1)
    create(host, with_chat_template(TOOLS_JINJA), "t-env", template=MESSAGES_TEMPLATE)
    rendered = debug_chat(host, "t-env", TURNS)["_debug_info"]["rendered_template"]
    if setting == "1":
        assert show(host, "t-env")["template"] == MESSAGES_TEMPLATE and rendered == TURNS_PROMPT
    else:
        assert show(host, "t-env")["template"] == TOOLS_JINJA and rendered == hf_render(TOOLS_JINJA, TURNS)


# --- chat-template autodetection -------------------------------------------------------------------------------

def test_levenshtein_is_the_edit_distance():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("é<", "e<") == 1
    assert levenshtein(CHATML_JINJA, CHATML_JINJA + "x" * 99) == 99


@pytest.mark.llamacpp
def test_an_import_near_a_named_template_gets_it_with_its_stops(url, with_chat_template, tiny_gguf, go_templates):
    near = with_chat_template(CHATML_JINJA.replace("message['content']", "message.content"))  # distance 4
    statuses = create(url, near, "t-auto")
    assert "using autodetected template chatml" in statuses
    info = show(url, "t-auto")
    assert info["template"] == CHATML_GOTMPL
    assert sorted(info["parameters"].splitlines()) == sorted(f'{"stop":<30} "{s}"' for s in CHATML_STOPS)
    assert "PARAMETER stop <|im_start|>" in info["modelfile"]
    expected = debug_chat(url, "t-auto", TURNS)["_debug_info"]["rendered_template"]
    assert expected == go_templates.render(CHATML_GOTMPL, TURNS)

    # The params layer is Go's json.Encoder output ('<' escaped), so its digest is Ollama's.
    data = b'{"stop":["\\u003c|im_start|\\u003e","\\u003c|im_end|\\u003e"]}\n'
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.head(f"{url}/api/blobs/{digest}", timeout=TIMEOUT).status_code == 200

    # A TEMPLATE sent replaces the detected one (no status line for it); sent parameters win, the stop stays.
    statuses = create(url, near, "t-auto-2", template=MESSAGES_TEMPLATE, parameters={"temperature": 0.5})
    assert not any(s.startswith("using autodetected") for s in statuses)
    info = show(url, "t-auto-2")
    assert info["template"] == MESSAGES_TEMPLATE and "temperature" in info["parameters"]
    assert info["parameters"].count("stop") == 2
    create(url, near, "t-auto-3", parameters={"stop": ["<|end|>"]})
    assert show(url, "t-auto-3")["parameters"] == f'{"stop":<30} "<|end|>"'

    # The threshold: below 100 edits a named template is used, at 100 none is.
    assert "using autodetected template chatml" in create(url, with_chat_template(CHATML_JINJA + "x" * 99), "t-99")
    statuses = create(url, with_chat_template(CHATML_JINJA + "x" * 100), "t-100")
    assert not any(s.startswith("using autodetected") for s in statuses)
    assert "parameters" not in show(url, "t-100") and show(url, "t-100")["template"] == CHATML_JINJA + "x" * 100

    # The tiny Phi-3's own chat template is no named template's (like Phi-3.5's): nothing is detected.
    assert not any(s.startswith("using autodetected") for s in create(url, tiny_gguf, "t-phi"))
