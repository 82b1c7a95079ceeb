"""Chat templates of families whose template the pinned llama.cpp sdist lacks, from the test data here.

Gemma 3's is Ollama's own copy of it: the "gemma3-instruct" entry of Ollama's template/index.json (the chat
template Ollama recognizes a Gemma 3 GGUF by), kept in tests/ollama_server/named_templates.json with the Ollama
commit it comes from.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

NAMED_TEMPLATES = Path(__file__).parent / "ollama_server" / "named_templates.json"
INDEX_ENTRIES = {"gemma3": "gemma3-instruct"}  # family -> Ollama's index entry


@cache
def family_chat_template(family: str) -> str | None:
    """The chat template tiny_models.write_family_model needs for `family` (None: the sdist has it)."""
    entry = INDEX_ENTRIES.get(family)
    if entry is None:
        return None
    index = json.loads(NAMED_TEMPLATES.read_text(encoding="utf-8"))["index"]
    [template] = [e["template"] for e in index if e["name"] == entry]
    return template
