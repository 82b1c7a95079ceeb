"""The built-in chat templates: Ollama `.Messages` templates, one per family's Hugging Face chat template.

Each renders what its family's own `chat_template` renders (transformers' apply_chat_template with
add_generation_prompt) for the conversations in `fidelity.CONVERSATIONS`, less the leading BOS that llama.cpp
adds when it tokenizes. What Ollama's template language cannot say is left out and documented in the README:
message text is not trimmed or stripped of newlines (Gemma's `| trim`, Qwen3's `.strip('\n')` of thinking), tool
definitions print as Go's compact JSON, tool-call arguments in sorted key order. Where the family's own template
refuses a conversation (Gemma 2 and a system message), the built-in fails too: a template error, which Ollama
answers with a 500 naming the refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class BuiltinTemplate:
    name: str
    family: str  # what the README and messages call it
    file: str  # under templates/
    end_of_turn: tuple[str, ...]  # the tokens that end an assistant turn in this format: always stops

    @property
    def text(self) -> str:
        return _read(self.file)

    @property
    def tools(self) -> bool:
        return ".Tools" in self.text


BUILTINS: dict[str, BuiltinTemplate] = {t.name: t for t in (
    BuiltinTemplate("llama3.1", "Llama 3.1 and 3.3", "llama3.1.gotmpl", ("<|eot_id|>",)),
    BuiltinTemplate("llama3.2", "Llama 3.2", "llama3.2.gotmpl", ("<|eot_id|>",)),
    BuiltinTemplate("llama3.3", "Llama 3.3", "llama3.1.gotmpl", ("<|eot_id|>",)),
    BuiltinTemplate("qwen2.5", "Qwen2.5", "qwen2.5.gotmpl", ("<|im_end|>",)),
    BuiltinTemplate("mistral-nemo", "Mistral Nemo", "mistral-nemo.gotmpl", ("</s>",)),
    BuiltinTemplate("phi3", "Phi-3 and Phi-3.5", "phi3.gotmpl", ("<|end|>",)),
    BuiltinTemplate("qwen3", "Qwen3", "qwen3.gotmpl", ("<|im_end|>",)),
    # before gemma3: on the conversations Gemma 2 can render (no system message) both render alike
    BuiltinTemplate("gemma2", "Gemma 2", "gemma2.gotmpl", ("<end_of_turn>",)),
    BuiltinTemplate("gemma3", "Gemma 3", "gemma3.gotmpl", ("<end_of_turn>",)),
    BuiltinTemplate("phi4", "Phi-4", "phi4.gotmpl", ("<|im_end|>",)),
)}
AUTO = "auto"


@cache
def _read(file: str) -> str:
    return (TEMPLATE_DIR / file).read_text(encoding="utf-8")
