"""modelfile.template: auto, the checks of a named or custom template, and stops derived from the tokenizer
(chat.setup), on the tiny Phi-3 model and edited copies of it. The families' real templates and tokenizers are
in test_conversation_fidelity.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from so8t_deploy.chat.fidelity import CONVERSATIONS
from so8t_deploy.chat.library import BUILTINS
from so8t_deploy.chat.setup import resolve_chat
from so8t_deploy.errors import ManifestError
from so8t_deploy.manifest.schema import Modelfile
from so8t_deploy.rollout.render import render_modelfile

# the template's end of turn, the tokenizer's eos, then generation_config's (<|end|> <|assistant|> <|endoftext|>)
PHI3_STOPS = ["<|end|>", "<|endoftext|>", "<|assistant|>"]


@pytest.fixture
def phi3_copy(tiny_model, tmp_path):
    """edit(**tokenizer_config changes, generation_eos=[ids]) -> a copy of the tiny Phi-3 model, edited."""

    copies = iter(range(1000))

    def edit(generation_eos: list[int] | None = None, **changes) -> Path:
        model = tmp_path / f"model-{next(copies)}"
        shutil.copytree(tiny_model("phi3", num_layers=1), model)
        path = model / "tokenizer_config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
        if generation_eos is not None:
            (model / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
        return model

    return edit


def _token_id(model: Path, text: str) -> int:
    decoder = json.loads((model / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return next(int(i) for i, token in decoder.items() if token["content"] == text)


def test_auto_picks_the_builtin_that_renders_the_models_template(tiny_model):
    chat = resolve_chat(Modelfile(system="Be brief."), tiny_model("phi3", num_layers=1))
    assert chat.builtin is BUILTINS["phi3"] and chat.template_name == "phi3"
    assert list(chat.stops) == PHI3_STOPS
    # every conversation but the tool call (Phi-3's template has no tools), each with the generation prompt
    assert [e.conversation for e in chat.expected] == [c.name for c in CONVERSATIONS if not c.needs_tools]
    assert all(e.prompt.endswith("<|assistant|>\n") for e in chat.expected)
    assert not any(e.prompt.startswith("<s>") for e in chat.expected)  # less the BOS llama.cpp adds
    no_system = next(e for e in chat.expected if e.conversation == "no system")
    assert no_system.prompt.startswith("<|system|>\nBe brief.<|end|>\n")  # the Modelfile SYSTEM, as Ollama adds it
    assert chat.capabilities == ()


def test_stops_come_from_the_template_and_every_eos_the_model_lists(phi3_copy):
    model = phi3_copy()
    end, user, text_end = (_token_id(model, t) for t in ("<|end|>", "<|user|>", "<|endoftext|>"))
    chat = resolve_chat(Modelfile(), phi3_copy(generation_eos=[text_end, user], eos_token="<|user|>"))
    assert list(chat.stops) == ["<|end|>", "<|user|>", "<|endoftext|>"]
    rendered = render_modelfile(Modelfile(parameters={"stop": ["<|placeholder1|>", "<|end|>"]}), Path("m.gguf"),
                                chat)
    assert rendered.parameters["stop"] == ["<|end|>", "<|user|>", "<|endoftext|>", "<|placeholder1|>"]
    chat = resolve_chat(Modelfile(), phi3_copy(generation_eos=[end], eos_token="<|end|>"))
    assert list(chat.stops) == ["<|end|>"]  # nothing hard-coded per family


def test_an_eos_id_the_tokenizer_does_not_name_is_refused(phi3_copy):
    model = phi3_copy(generation_eos=[999999])
    with pytest.raises(Exception, match=r"generation_config.json: eos_token_id 999999 is not one of the tokenizer"):
        resolve_chat(Modelfile(), model)


def test_auto_without_a_match_names_the_closest_conversation_and_position(phi3_copy):
    template = json.loads((phi3_copy() / "tokenizer_config.json").read_text())["chat_template"]
    model = phi3_copy(chat_template=template.replace("<|assistant|>", "<|assistant|> "))
    with pytest.raises(ManifestError) as raised:
        resolve_chat(Modelfile(), model)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("modelfile.template: auto: no built-in template renders ")
    assert ("closest, phi3: conversation 'system and one user turn' differs at character 95: the model's template "
            "renders ' \\n', this one '\\n'") in message
    assert "modelfile.template: path/to/modelfile.j2" in message and "unchecked_template" in message


def test_auto_needs_a_chat_template(phi3_copy):
    with pytest.raises(ManifestError, match=r"^modelfile.template: auto: .*/model-0 has no chat template"):
        resolve_chat(Modelfile(), phi3_copy(chat_template=None))


def test_a_named_builtin_is_checked_unless_the_manifest_opts_out(tiny_model, tmp_path):
    model = tiny_model("phi3", num_layers=1)
    with pytest.raises(ManifestError, match=r"^modelfile.template: qwen2.5: TEMPLATE does not render .*"
                                            r"conversation 'system and one user turn' differs at character 2"):
        resolve_chat(Modelfile(template="qwen2.5"), model)
    chat = resolve_chat(Modelfile(template="qwen2.5", unchecked_template="qwen2.5"), model)
    assert chat.expected == () and list(chat.stops) == ["<|im_end|>", "<|endoftext|>", "<|end|>", "<|assistant|>"]


def test_a_template_with_tools_or_thinking_wants_those_capabilities(phi3_copy):
    template = json.loads((phi3_copy() / "tokenizer_config.json").read_text())["chat_template"]
    thinking = "{% if enable_thinking %}<think>{% endif %}" + template
    tools = "{% if tools %}{{ tools | tojson }}{% endif %}" + template
    assert resolve_chat(Modelfile(template="phi3", unchecked_template="phi3"),
                        phi3_copy(chat_template=thinking)).capabilities == ("thinking",)
    assert resolve_chat(Modelfile(template="phi3", unchecked_template="phi3"),
                        phi3_copy(chat_template=tools)).capabilities == ("tools",)


def test_the_opt_out_must_name_the_template(tmp_path, run_cli):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("apiVersion: so8t-deploy/v1\nname: x\nsource: {model: ./m}\nquantize: [q8_0]\n"
                        "modelfile: {template: phi3, unchecked_template: qwen2.5}\n")
    result = run_cli("validate", manifest)
    assert result.code == 2 and "modelfile.unchecked_template: " in result.err
    assert "the opt-out must name the template it exempts" in result.err
    manifest.write_text("apiVersion: so8t-deploy/v1\nname: x\nsource: {model: ./m}\nquantize: [q8_0]\n"
                        "modelfile: {template: chatml}\n")
    result = run_cli("validate", manifest)
    assert result.code == 2 and "unknown built-in template 'chatml' (known: auto, llama3.1" in result.err
