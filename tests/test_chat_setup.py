"""modelfile.template: auto, the checks of a named or custom template, and stops derived from the tokenizer
(chat.setup), on the tiny Phi-3 model and edited copies of it; then the built-ins of Qwen3, Gemma 2, Gemma 3 and
Phi-4 against their families' real chat templates (tiny_models.write_family_model), rendered by transformers.
The host side, end to end, is in test_conversation_fidelity.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from so8t_deploy.builtin_templates import BUILTINS
from so8t_deploy.chat.fidelity import CONVERSATIONS, Conversation, check_template
from so8t_deploy.chat.gotemplate import GoTemplateError
from so8t_deploy.chat.ollama_render import render_chat
from so8t_deploy.chat.setup import resolve_chat
from so8t_deploy.chat.think_tags import think_tags
from so8t_deploy.errors import ManifestError
from so8t_deploy.manifest.schema import Modelfile
from so8t_deploy.rollout.render import render_modelfile
from tests.hf_oracle import trained_prompt

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
    # every conversation but the tool call and thinking (Phi-3's template has neither), with the generation prompt
    assert [e.conversation for e in chat.expected] == [c.name for c in CONVERSATIONS
                                                       if not c.needs_tools and not c.needs_thinking]
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


# --- the built-ins of Qwen3, Gemma 2, Gemma 3 and Phi-4 against their families' own templates -----------------

NEW_FAMILIES = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi4": "phi4"}  # family -> built-in
SYSTEM = "Answer briefly."


def applicable(family: str) -> list[Conversation]:
    return [c for c in CONVERSATIONS if (family == "qwen3" or not c.needs_tools and not c.needs_thinking)]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "system"), [
    pytest.param(family, system, id=f"{family}-{'SYSTEM' if system else 'no-SYSTEM'}")
    for family in NEW_FAMILIES for system in (None, SYSTEM)
    if not (family == "gemma2" and system)])  # Gemma 2 refuses one: test_a_system_prompt_for_gemma_2_is_refused
def test_auto_picks_each_new_builtin_and_it_renders_as_transformers_does(family, system, family_model,
                                                                         family_tokenizer):
    model, tokenizer = family_model(family), family_tokenizer(family)
    chat = resolve_chat(Modelfile(system=system), model)
    builtin = BUILTINS[NEW_FAMILIES[family]]
    assert chat.builtin is builtin and chat.template_name == builtin.name
    conversations = applicable(family)
    refusing = {c.name for c in conversations if family == "gemma2" and c.messages[0]["role"] == "system"}
    assert [e.conversation for e in chat.expected] == [c.name for c in conversations if c.name not in refusing]
    assert {r.conversation for r in chat.refused} == refusing
    for conversation in conversations:
        if conversation.name in refusing:
            continue
        expected = trained_prompt(tokenizer, conversation, system)
        assert render_chat(builtin.text, [dict(m) for m in conversation.messages], system=system,
                           think=conversation.think) == expected, conversation.name
        assert next(e for e in chat.expected if e.conversation == conversation.name).prompt == expected
    assert chat.capabilities == (("tools", "thinking") if family == "qwen3" else ())
    assert list(chat.stops) == {"qwen3": ["<|im_end|>", "<|endoftext|>"], "gemma2": ["<end_of_turn>", "<eos>"],
                                "gemma3": ["<end_of_turn>", "<eos>"], "phi4": ["<|im_end|>"]}[family]


@pytest.mark.slow
def test_qwen3_thinking_is_rendered_as_its_template_does(family_model):
    chat = resolve_chat(Modelfile(), family_model("qwen3"))
    prompts = {e.conversation: e.prompt for e in chat.expected}
    turn = "<|im_start|>assistant\n"
    assert prompts["thinking turned off"].endswith(turn + "<think>\n\n</think>\n\n")  # enable_thinking=false
    assert prompts["thinking turned on"] == prompts["thinking left unset"] == prompts["no system"]
    assert prompts["thinking turned on"].endswith(turn)
    # thinking before the last question is dropped; after it (a tool call's) it is kept
    assert "Small primes" not in prompts["the thinking of an earlier turn"]
    tool_turn = prompts["thinking before a tool call, after an earlier thinking turn"]
    assert "Small primes" not in tool_turn
    assert turn + "<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n" in tool_turn
    # Ollama's thinking.InferTags finds the tags (so hosts list "thinking" and keep this TEMPLATE); without them a
    # host would refuse think: true, and the check says so
    assert think_tags(BUILTINS["qwen3"].text) == ("<think>", "</think>")
    untagged = BUILTINS["qwen3"].text.replace("<think>\n{{ .Thinking }}\n</think>", "{{ .Thinking }}")
    mismatch = check_template(untagged, chat.expected, None)
    assert mismatch is not None and mismatch.conversation == "thinking turned on"
    assert "a host refuses think: true for it" in mismatch.describe()


@pytest.mark.slow
def test_gemma3_folds_the_system_prompt_into_the_first_user_turn(family_model):
    chat = resolve_chat(Modelfile(system=SYSTEM), family_model("gemma3"))
    prompts = {e.conversation: e.prompt for e in chat.expected}
    assert prompts["no system"] == (f"<start_of_turn>user\n{SYSTEM}\n\nName a prime number.<end_of_turn>\n"
                                    "<start_of_turn>model\n")
    assert prompts["multi-turn with assistant turns"].count("You are a terse assistant.") == 1
    assert "<start_of_turn>model\nSeven.<end_of_turn>\n" in prompts["multi-turn with assistant turns"]


@pytest.mark.slow
def test_a_system_prompt_for_gemma_2_is_refused(family_model, tmp_path, run_cli):
    model = family_model("gemma2")
    origin = model / "tokenizer_config.json"
    with pytest.raises(ManifestError) as raised:
        resolve_chat(Modelfile(system=SYSTEM), model)
    assert str(raised.value).startswith(f"modelfile.system: {origin}'s chat_template refuses a system message "
                                        "(System role not supported)")
    with pytest.raises(ManifestError, match=r"^modelfile.system: .*System role not supported"):
        resolve_chat(Modelfile(template="gemma2", system=SYSTEM), model)  # a named template too
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"apiVersion: so8t-deploy/v1\nname: g\nsource: {{model: {model}}}\nquantize: [q8_0]\n"
                        f"modelfile: {{template: auto, system: {SYSTEM!r}}}\n")
    result = run_cli("validate", manifest)
    assert result.code == 2 and result.out == ""
    [line] = result.err.splitlines()
    assert "modelfile.system" in line and str(origin) in line and "System role not supported" in line
    # Without a SYSTEM it validates; the conversations with a system message are skipped, with the reason.
    manifest.write_text(manifest.read_text().replace(f", system: {SYSTEM!r}", ""))
    result = run_cli("validate", manifest)
    assert result.code == 0, result.err
    said = result.out + result.err
    assert "modelfile.template: gemma2: renders the model's chat template on 2 conversations" in said
    assert ("conversation 'system and one user turn' skipped: the model's own template refuses it (System role "
            "not supported)") in said


def test_the_gemma2_builtin_refuses_a_system_message_as_gemma_2_does():
    with pytest.raises(GoTemplateError, match=r'at <slice "System role not supported" 99>'):
        render_chat(BUILTINS["gemma2"].text, [{"role": "user", "content": "Hi"}], system=SYSTEM)
    assert render_chat(BUILTINS["gemma2"].text, [{"role": "user", "content": " Hi "}]) == (
        "<start_of_turn>user\n Hi <end_of_turn>\n<start_of_turn>model\n")  # not trimmed: Go cannot


def test_the_phi4_template_is_read_from_llama_cpps_test_cases():
    from so8t_deploy.tiny_models import _c_unescape, chat_template_case

    template = chat_template_case("phi-4")
    assert template.startswith("{% for message in messages %}{% if (message['role'] == 'system') %}"
                               "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}")
    assert _c_unescape(r"a\nb\\n\"q\" \x41\101") == 'a\nb\\n"q" AA'
    with pytest.raises(ValueError, match="no case named 'no-such-model'"):
        chat_template_case("no-such-model")
