"""What each host serves is the conversation the model was trained on (issue 18), end to end: tiny models of real
chat families (their own tokenizers and chat templates, tiny_models.write_family_model) built with
`template: auto`, applied to the Ollama test server, and the prompt the host renders for each fixed conversation
(`_debug_render_only`, with the conversation's think) compared with transformers' `apply_chat_template` (think as
enable_thinking, a message's thinking as reasoning_content). Gemma 2's template refuses a system message: those
conversations are not compared, and the host refuses them too."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from so8t_deploy.builtin_templates import BUILTINS
from so8t_deploy.chat.fidelity import CONVERSATIONS, Conversation
from so8t_deploy.chat.setup import resolve_chat
from so8t_deploy.manifest.modelfile import parse_modelfile
from so8t_deploy.manifest.schema import Modelfile
from so8t_deploy.rollout.render import render_modelfile
from so8t_deploy.tiny_models import write_family_model
from tests.hf_oracle import trained_prompt

pytestmark = pytest.mark.llamacpp

SYSTEM = "Answer briefly."  # the Modelfile's: Ollama adds it to a conversation that has no system message
END_OF_TURN = {"llama3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>", "mistral-nemo": "</s>", "phi3.5": "<|end|>",
               "qwen3": "<|im_end|>", "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi4": "<|im_end|>"}
WITH_TOOLS = {"llama3.1", "qwen2.5", "mistral-nemo", "qwen3"}  # Phi-3.5's, Gemma's and Phi-4's templates have none
WITH_THINKING = {"qwen3"}
NO_SYSTEM = {"gemma2"}  # its template refuses a system message ("System role not supported")
# A Llama 3.1 TEMPLATE that renders plain turns and knows nothing of tools (no .Tools, no .ToolCalls).
NO_TOOLS_TEMPLATE = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""


@pytest.fixture(scope="module")
def build_cache(tmp_path_factory) -> Path:
    """One build cache for the module: a GGUF built for one test is reused by the next."""
    return tmp_path_factory.mktemp("fidelity-cache")


def manifest_for(path: Path, model: Path, name: str, urls: list[str], modelfile: str = "{}") -> Path:
    targets = "\n".join(f"  - {{name: host-{i}, host: '{url}', timeout_s: 120}}" for i, url in enumerate(urls))
    targets = targets or "  []"
    path.write_text(f"""\
apiVersion: so8t-deploy/v1
name: {name}
source: {{model: {model}}}
quantize: [f16]
modelfile: {modelfile}
targets:
{targets}
rollout: {{canary: 1}}
smoke: []
""")
    return path


def custom_template(path: Path, go_template: str) -> Path:
    """A custom modelfile.j2 that sends `go_template` as the TEMPLATE, with the derived stops."""
    path.write_text("{% set go %}{% raw %}" + go_template + "{% endraw %}{% endset %}"
                    "FROM ./{{ gguf_file }}\nTEMPLATE {{ quote(go) }}\n"
                    "{% if system %}SYSTEM {{ quote(system) }}\n{% endif %}"
                    "{% for stop in stops %}PARAMETER stop {{ quote(stop) }}\n{% endfor %}")
    return path


def host_answer(url: str, model: str, conversation: Conversation) -> httpx.Response:
    think = {} if conversation.think is None else {"think": conversation.think}
    return httpx.post(f"{url}/api/chat", timeout=120, json={
        "model": model, "messages": list(conversation.messages), "stream": False, "_debug_render_only": True,
        **think})


def host_render(url: str, model: str, conversation: Conversation) -> str:
    answer = host_answer(url, model, conversation)
    answer.raise_for_status()
    return answer.json()["_debug_info"]["rendered_template"]


def host_stops(url: str, model: str) -> list[str]:
    shown = httpx.post(f"{url}/api/show", timeout=30, json={"model": model}).json()
    return [c.args for c in parse_modelfile(shown["modelfile"]) if c.name == "stop"]


def tokenizer_stops(tokenizer, model_dir: Path, end_of_turn: str) -> list[str]:
    """The stops the tokenizer implies: the format's end of turn, its EOS, every EOS generation_config lists."""
    listed = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    eos = tokenizer.convert_ids_to_tokens(listed if isinstance(listed, list) else [listed])
    return list(dict.fromkeys([end_of_turn, tokenizer.eos_token, *eos]))


# --- acceptance 1: each family's host renders what its tokenizer renders ---------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3.1", "qwen2.5", "mistral-nemo", "phi3.5", "qwen3", "gemma2", "gemma3",
                                    "phi4"])
def test_the_host_renders_each_conversation_as_the_tokenizer_does(family, family_model, family_tokenizer, pool,
                                                                   build_cache, tmp_path, run_cli):
    model, tokenizer = family_model(family), family_tokenizer(family)
    [url] = pool.start(1)
    name = "fidelity-" + family.replace(".", "-")
    system = None if family in NO_SYSTEM else SYSTEM
    modelfile = "{template: auto}" if system is None else f"{{template: auto, system: {system!r}}}"
    manifest = manifest_for(tmp_path / "m.yaml", model, name, [url], modelfile)
    result = run_cli("apply", manifest, "--cache-dir", build_cache, "--json")
    assert result.code == 0, result.err
    smoke = json.loads(result.out)["hosts"][0]["smoke"]
    checked = {s["prompt"] for s in smoke if s["kind"] == "conversation" and s["passed"]}  # the product's check
    tag = f"{name}:f16"
    conversations = [c for c in CONVERSATIONS if (family in WITH_TOOLS or not c.needs_tools)
                     and (family in WITH_THINKING or not c.needs_thinking)]
    refused = [c for c in conversations if family in NO_SYSTEM and c.messages[0]["role"] == "system"]
    compared = [c for c in conversations if c not in refused]
    assert checked == {f"conversation: {c.name}" for c in compared}
    for conversation in compared:
        assert host_render(url, tag, conversation) == trained_prompt(tokenizer, conversation, system), \
            conversation.name
    for conversation in refused:  # the model's own template raises; so does the host's TEMPLATE
        with pytest.raises(Exception, match="System role not supported"):
            trained_prompt(tokenizer, conversation, system)
        answer = host_answer(url, tag, conversation)
        assert answer.status_code == 500 and "System role not supported" in answer.json()["error"]
    assert host_stops(url, tag) == tokenizer_stops(tokenizer, model, END_OF_TURN[family])


# --- acceptance 2: a custom template one character off is refused ------------------------------------------------

def test_a_custom_template_one_character_off_is_refused_by_validate(family_model, family_tokenizer, tmp_path,
                                                                     run_cli):
    model, tokenizer = family_model("qwen2.5"), family_tokenizer("qwen2.5")
    off_by_one = BUILTINS["qwen2.5"].text.replace("<|im_start|>system\n", "<|im_start|>System\n", 1)
    template = custom_template(tmp_path / "qwen.j2", off_by_one)
    manifest = manifest_for(tmp_path / "m.yaml", model, "qwen-custom", [], f"{{template: {template}}}")
    result = run_cli("validate", manifest)
    assert result.code == 2 and result.out == ""
    [line] = result.err.splitlines()
    first = CONVERSATIONS[0]
    position = trained_prompt(tokenizer, first, None).index("system")
    origin = model / "tokenizer_config.json"
    assert line.startswith(f"{manifest}: {template}: TEMPLATE does not render {origin}'s chat_template")
    assert f"conversation {first.name!r} differs at character {position}:" in line
    assert "modelfile.unchecked_template" in line

    template = custom_template(tmp_path / "qwen.j2", BUILTINS["qwen2.5"].text)  # the same, exact: accepted
    assert run_cli("validate", manifest).code == 0


# --- acceptance 3: a host that renders the GGUF's own template is caught by the smoke test -----------------------

@pytest.mark.slow
def test_a_template_without_tools_is_caught_when_the_host_renders_the_ggufs_own(family_model, pool, build_cache,
                                                                                tmp_path, run_cli):
    [url] = pool.start(1)
    template = custom_template(tmp_path / "plain.j2", NO_TOOLS_TEMPLATE)
    manifest = manifest_for(tmp_path / "m.yaml", family_model("llama3.1"), "fidelity-llama3-1", [url],
                            f"{{template: {template}, unchecked_template: {template}}}")
    result = run_cli("apply", manifest, "--cache-dir", build_cache)
    assert result.code != 0
    assert "host renders the GGUF's own chat template, not the TEMPLATE sent" in result.err
    tags = httpx.get(f"{url}/api/tags", timeout=30).json()["models"]
    assert "fidelity-llama3-1:f16" not in {m["name"] for m in tags}  # never served


# --- acceptance 4: stops come from the tokenizer, not from the family ---------------------------------------------

def test_stops_follow_a_tokenizer_whose_eos_is_not_the_familys(family_model, family_tokenizer, tmp_path):
    import transformers

    # a fine-tune of Llama 3.1's base model: its EOS is <|end_of_text|>, and generation stops only there
    tuned = write_family_model(tmp_path / "llama3.1", "llama3.1", eos_override="<|end_of_text|>",
                               generation_eos=["<|end_of_text|>"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tuned)
    assert tokenizer.eos_token == "<|end_of_text|>" != family_tokenizer("llama3.1").eos_token
    chat = resolve_chat(Modelfile(), tuned)
    assert chat.builtin is BUILTINS["llama3.1"]
    stops = render_modelfile(Modelfile(), Path("m.gguf"), chat).parameters["stop"]
    assert stops == tokenizer_stops(tokenizer, tuned, "<|eot_id|>") == ["<|eot_id|>", "<|end_of_text|>"]
    default = resolve_chat(Modelfile(), family_model("llama3.1"))
    assert list(default.stops) == ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]  # the family's own list
