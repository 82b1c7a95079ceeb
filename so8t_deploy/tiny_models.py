"""Tiny, real Hugging Face models and SO8T adapters, built on the spot.

Nothing here downloads anything: `demo init` and the test fixtures use these builders to
make models that transformers loads and llama.cpp's converter accepts as the real thing.
Heavy imports (torch, transformers, sentencepiece) happen inside the functions.

`write_family_model` builds a tiny model of a real chat family (Llama 3.x, Qwen2.5, Qwen3, Mistral Nemo,
Phi-3.5, Phi-4, Gemma 2 and 3) with that family's own tokenizer (or a documented substitute) and chat template,
taken from the llama.cpp sources of the pinned llama-cpp-python sdist (see
`external.llamacpp.locate_llama_cpp_models`); Gemma 3's template is the caller's.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is imported inside the functions
    from transformers import PretrainedConfig

# Phi-3's special tokens, appended after the SentencePiece vocabulary in this order.
PHI3_SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
SPM_VOCAB_SIZE = 300
MODEL_VOCAB_SIZE = 320  # SentencePiece pieces + special tokens, padded like Phi-3's 32064

_WORDS = [
    "hello", "world", "model", "adapter", "rotation", "block", "gate", "tensor", "weight", "layer",
    "phi", "llama", "deploy", "server", "quant", "ladder", "bake", "fold", "exact", "logits",
    "prompt", "reply", "assistant", "system", "user", "token", "vector", "spinor", "the", "a",
    "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "by", "at", "from",
]


def _corpus(lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines)]


def write_sentencepiece_tokenizer(out_dir: Path) -> None:
    """Train a small byte-fallback BPE model and write Phi-3 style tokenizer files."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=SPM_VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink()
    special_ids = {tok: SPM_VOCAB_SIZE + i for i, tok in enumerate(PHI3_SPECIAL_TOKENS)}
    base_decoder = {
        str(i): {"content": tok, "special": True, "lstrip": False, "rstrip": False,
                 "normalized": False, "single_word": False}
        for i, tok in enumerate(["<unk>", "<s>", "</s>"])
    }
    added_decoder = {
        str(i): {"content": tok, "special": True, "lstrip": False, "rstrip": tok != "<|endoftext|>",
                 "normalized": False, "single_word": False}
        for tok, i in special_ids.items()
    }
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "legacy": False,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {**base_decoder, **added_decoder},
        "chat_template": PHI3_CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "added_tokens.json", special_ids)
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
    )


def tiny_config(arch: str, hidden_size: int = 256, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int | None = None, tie_word_embeddings: bool | None = None,
                **extra: Any) -> PretrainedConfig:
    """A transformers config of the given architecture with real-model structure and tiny sizes.

    Architectures: phi3 (also Phi-4: pass num_kv_heads < num_heads), llama, mistral, qwen2, qwen3, gemma2,
    gemma3 (Gemma3ForCausalLM's gemma3_text). Embeddings are tied where the family's small models tie them
    (Gemma) unless `tie_word_embeddings` says otherwise.

    `extra` goes to the config as is (e.g. attention_bias=True for a Llama with biases).
    """
    import transformers

    common = dict(
        vocab_size=MODEL_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=bool(tie_word_embeddings) if tie_word_embeddings is not None else arch.startswith("gemma"),
        bos_token_id=1,
        eos_token_id=SPM_VOCAB_SIZE,  # <|endoftext|>
        pad_token_id=SPM_VOCAB_SIZE,
        initializer_range=0.08,  # larger than the default so adapters visibly move the logits
        **extra,
    )
    if arch == "phi3":
        return transformers.Phi3Config(original_max_position_embeddings=4096, **common)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    head_dim = hidden_size // num_heads
    if arch == "qwen3":  # per-head q_norm/k_norm; head_dim is its own field (128 in every Qwen3)
        return transformers.Qwen3Config(head_dim=head_dim, **common)
    if arch == "gemma2":
        # Sandwich norms, a scaled and tied embedding, attention and final logit soft-capping, sliding
        # windows on every other layer. query_pre_attn_scalar is head_dim, as in Gemma 2 2B and 9B (llama.cpp
        # scales by head_dim for every size but 27B).
        return transformers.Gemma2Config(**_gemma_sizes(common, head_dim))
    if arch in ("gemma3", "gemma3_text"):
        # Gemma 2's structure plus q_norm/k_norm, five sliding layers to one global, no attention soft-capping.
        return transformers.Gemma3TextConfig(**_gemma_sizes(common, head_dim))
    raise ValueError(f"no tiny config for architecture {arch!r}")


def _gemma_sizes(common: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """Gemma's config fields at tiny sizes."""
    return {"head_dim": head_dim, "query_pre_attn_scalar": head_dim, "sliding_window": 512,
            "hidden_activation": "gelu_pytorch_tanh", **common, "rms_norm_eps": 1e-6}


def write_tiny_model(out_dir: Path, arch: str = "phi3", *, seed: int = 0, dtype: str = "float32",
                     max_shard_size: str | None = None, **config_kwargs: Any) -> Path:
    """Save a randomly initialised model of `arch` with a SentencePiece tokenizer; return out_dir."""
    import torch
    import transformers

    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    model.generation_config.eos_token_id = [SPM_VOCAB_SIZE + PHI3_SPECIAL_TOKENS.index(t)
                                            for t in ("<|end|>", "<|assistant|>", "<|endoftext|>")]
    model.generation_config.save_pretrained(out_dir)
    write_sentencepiece_tokenizer(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Tiny models of real chat families: their own tokenizer and chat template, tiny random weights.


def _llama31_specials() -> dict[int, str]:
    """Llama 3.1+ names for the special tokens that Llama 3 (the vocabulary GGUF) left reserved."""
    names = {128004: "<|finetune_right_pad_id|>", 128005: "<|reserved_special_token_2|>",
             128008: "<|eom_id|>", 128010: "<|python_tag|>"}
    names.update({i: f"<|reserved_special_token_{i - 128008}|>" for i in range(128011, 128256)})
    return names


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_QWEN25_ADDED = (  # Qwen2.5's tokens after <|im_end|> (151645): (text, special)
    *((t, True) for t in ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                          "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")),
    *((t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")),
)
# The control tokens Mistral's v3 templates write (Tekken has them among its first ids); appended here.
MISTRAL_CONTROL_TOKENS = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                          "[/TOOL_RESULTS]", "[TOOL_CALLS]")
_QWEN3_ADDED = (*_QWEN25_ADDED, *((t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")))
# Appended to the substitute vocabulary: Gemma's own special tokens (transformers' GemmaTokenizer adds a <mask>
# where the vocabulary has none).
GEMMA_CHAT_TOKENS = ("<pad>", "<mask>", "<start_of_turn>", "<end_of_turn>")
PHI4_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|im_sep|>")  # appended to GPT-2's vocabulary
_PHI3_RSTRIP = frozenset({"</s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>",
                          *(f"<|placeholder{i}|>" for i in range(1, 7))})


@dataclass(frozen=True)
class ChatFamily:
    """What a family's real checkpoint has, for a tiny model to have it too."""

    arch: str  # tiny_config's architecture
    vocab: str  # the vocabulary GGUF in llama.cpp's models/
    template: str | None  # the chat template, models/templates/NAME; None: template_case's, else the caller's
    tokenizer_class: str  # tokenizer_config.json's, as the real repository has it
    bos: str | None  # the tokenizer's bos_token (Qwen2.5 has none)
    eos: str
    generation_eos: tuple[str, ...]  # generation_config.json's eos_token_id, by token text
    add_bos: bool  # whether encoding a text starts it with bos
    pad: str | None = None
    renamed: Mapping[int, str] = field(default_factory=dict)  # vocabulary tokens the family spells otherwise
    added: tuple[tuple[str, bool], ...] = ()  # (text, special) appended after the vocabulary's own tokens
    rstrip: frozenset[str] = frozenset()  # added tokens that take the whitespace after them
    vocab_size: int | None = None  # config.json's, padded as the real model's; None: len(tokenizer)
    tie_word_embeddings: bool = False
    sentencepiece: bool = False  # the repository also ships tokenizer.model (the converter reads it)
    num_kv_heads: int = 2
    model_max_length: int = 131072
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    template_case: str | None = None  # the chat template of this named case of llama.cpp's test-chat-template.cpp
    space_prefix: bool = True  # a SentencePiece vocabulary starts text with a word boundary (Gemma's does not)


def _llama3(template: str, rope_factor: float, tie: bool) -> ChatFamily:
    return ChatFamily(
        arch="llama", vocab="ggml-vocab-llama-bpe.gguf", template=template, tokenizer_class="PreTrainedTokenizerFast",
        bos="<|begin_of_text|>", eos="<|eot_id|>", generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        add_bos=True, renamed=_llama31_specials(), tie_word_embeddings=tie, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": rope_factor},
    )


def _gemma(arch: str, template: str | None, **sizes: Any) -> ChatFamily:
    """Gemma 2 and 3 on a substitute of Gemma's SentencePiece vocabulary (see write_family_model)."""
    return ChatFamily(
        arch=arch, vocab="ggml-vocab-llama-spm.gguf", template=template, tokenizer_class="GemmaTokenizer",
        bos="<bos>", eos="<eos>", pad="<pad>", generation_eos=("<eos>", "<end_of_turn>"), add_bos=True,
        renamed={1: "<bos>", 2: "<eos>"}, added=tuple((t, True) for t in GEMMA_CHAT_TOKENS), sentencepiece=True,
        space_prefix=False, tie_word_embeddings=True, model_max_length=sizes["max_position_embeddings"], **sizes,
    )


FAMILY_SPECS: dict[str, ChatFamily] = {
    "llama3.1": _llama3("meta-llama-Llama-3.1-8B-Instruct.jinja", 8.0, tie=False),
    "llama3.2": _llama3("meta-llama-Llama-3.2-3B-Instruct.jinja", 32.0, tie=True),
    "llama3.3": _llama3("meta-llama-Llama-3.3-70B-Instruct.jinja", 8.0, tie=False),
    "qwen2.5": ChatFamily(
        arch="qwen2", vocab="ggml-vocab-qwen2.gguf", template="Qwen-Qwen2.5-7B-Instruct.jinja",
        tokenizer_class="Qwen2Tokenizer", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"), add_bos=False, added=_QWEN25_ADDED, vocab_size=152064,
        model_max_length=131072, max_position_embeddings=32768, rope_theta=1000000.0,
    ),
    "mistral-nemo": ChatFamily(
        arch="mistral", vocab="ggml-vocab-llama-spm.gguf", template="mistralai-Mistral-Nemo-Instruct-2407.jinja",
        tokenizer_class="PreTrainedTokenizerFast", bos="<s>", eos="</s>", generation_eos=("</s>",), add_bos=True,
        added=tuple((t, True) for t in MISTRAL_CONTROL_TOKENS), sentencepiece=True,
        max_position_embeddings=131072, rope_theta=1000000.0,
    ),
    "phi3.5": ChatFamily(
        arch="phi3", vocab="ggml-vocab-phi-3.gguf", template="microsoft-Phi-3.5-mini-instruct.jinja",
        tokenizer_class="LlamaTokenizer", bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
        generation_eos=("<|end|>", "<|assistant|>", "<|endoftext|>"), add_bos=False, rstrip=_PHI3_RSTRIP,
        vocab_size=32064, sentencepiece=True, num_kv_heads=4,
    ),
    "qwen3": ChatFamily(
        arch="qwen3", vocab="ggml-vocab-qwen2.gguf", template="Qwen-Qwen3-0.6B.jinja",
        tokenizer_class="Qwen2Tokenizer", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"), add_bos=False, added=_QWEN3_ADDED, vocab_size=151936,
        tie_word_embeddings=True, model_max_length=131072, max_position_embeddings=40960, rope_theta=1000000.0,
    ),
    "gemma2": _gemma("gemma2", "google-gemma-2-2b-it.jinja", max_position_embeddings=8192, rope_theta=10000.0),
    "gemma3": _gemma("gemma3", None, max_position_embeddings=32768, rope_theta=1000000.0),
    "phi4": ChatFamily(
        arch="phi3", vocab="ggml-vocab-gpt-2.gguf", template=None, template_case="phi-4",
        tokenizer_class="GPT2Tokenizer", bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>",
        generation_eos=("<|im_end|>",), add_bos=False, added=tuple((t, True) for t in PHI4_CHAT_TOKENS),
        vocab_size=50304, model_max_length=16384, max_position_embeddings=16384, rope_theta=250000.0,
    ),
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_SPECS)
_PAD_TOKEN = re.compile(r"\[PAD\d+\]")  # llama.cpp's filler for ids a vocabulary does not use


def write_family_model(out_dir: Path, family: str, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                       eos_override: str | None = None, generation_eos: list[str] | None = None,
                       chat_template: str | None = None) -> Path:
    """Save a tiny random model of a real chat family with its real tokenizer and chat template; return out_dir.

    The tokenizer is the family's vocabulary GGUF from llama.cpp's models/, read by transformers
    (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), then given what the real repository's
    tokenizer has and the GGUF lacks: its bos/eos, its added tokens, its `chat_template` (in
    tokenizer_config.json, taken verbatim from llama.cpp's models/templates/), and, for a
    SentencePiece vocabulary, the `tokenizer.model` that llama.cpp's converter reads.

    Families (FAMILIES) and their sources:

    * llama3.1, llama3.2, llama3.3 -- ggml-vocab-llama-bpe.gguf (Llama 3's vocabulary, renamed to
      3.1's special tokens: <|eom_id|>, <|python_tag|>, ...), bos <|begin_of_text|>, eos <|eot_id|>,
      generation eos <|end_of_text|> <|eom_id|> <|eot_id|>; llama3 RoPE scaling; 3.2 ties embeddings.
    * qwen2.5 -- ggml-vocab-qwen2.gguf plus Qwen2.5's added tokens (<|object_ref_start|> ... <|file_sep|>,
      ids 151646-151664), no bos, eos <|im_end|>, config vocab 152064 as Qwen2.5-7B's.
    * mistral-nemo -- a substitute tokenizer: Nemo's Tekken vocabulary (tiktoken BPE, 131k) is not in
      the sdist, so this is ggml-vocab-llama-spm.gguf (SentencePiece BPE: the shape of Mistral's own
      pre-Tekken tokenizers, with <unk> <s> </s> at ids 0 1 2, as in Tekken), plus Mistral's control
      tokens ([INST] [/INST] [AVAILABLE_TOOLS] [/AVAILABLE_TOOLS] [TOOL_RESULTS] [/TOOL_RESULTS]
      [TOOL_CALLS]) as special tokens at ids 32000-32006; bos <s>, eos </s>; arch mistral. Text after
      a special token starts a word (Llama 2's normalizer, as llama.cpp reads SentencePiece), where
      Tekken has no such prefix at all.
    * phi3.5 -- ggml-vocab-phi-3.gguf (ids 0-32010), bos <s> (not added), eos <|endoftext|>,
      generation eos <|end|> <|assistant|> <|endoftext|>, config vocab 32064. llama.cpp gives Phi-3's
      special tokens their rstrip (as transformers does here) only when the GGUF's general.name, by
      default the model directory's name, contains "phi3" or "phi-3": name the directory e.g. phi3.5.

    * qwen3 -- ggml-vocab-qwen2.gguf plus Qwen3's added tokens: Qwen2.5's, then <tool_response>
      </tool_response> <think> </think> (ids 151665-151668, not special), no bos, eos <|im_end|>,
      generation eos <|im_end|> <|endoftext|>, config vocab 151936, tied embeddings (Qwen3-0.6B's);
      template Qwen-Qwen3-0.6B.jinja (thinking: enable_thinking, reasoning_content).
    * gemma2, gemma3 -- a substitute tokenizer: Gemma's SentencePiece vocabulary (256k) is not in the
      sdist (ggml-vocab-gemma-4.gguf is Gemma 4's, another tokenizer), so this is ggml-vocab-llama-spm.gguf
      with ids 1 and 2 renamed <bos> and <eos>, plus <pad> <mask> <start_of_turn> <end_of_turn> as special
      tokens at ids 32000-32003; bos <bos> (added), eos <eos>, generation eos <eos> <end_of_turn>, tied embeddings.
      As in Gemma's own tokenizer, text has no dummy prefix (no word boundary at its start, after a special
      token either), which is how llama.cpp reads every Gemma GGUF (add_space_prefix false). Gemma 2's
      template is google-gemma-2-2b-it.jinja (it refuses a system message); Gemma 3's is not in the sdist:
      pass it as `chat_template` (tests take it from Ollama's template/index.json, see
      tests/family_templates.py). Gemma 3 is Gemma3ForCausalLM (the text-only model, as gemma-3-1b-it).
    * phi4 -- microsoft/phi-4's template, the "phi-4" case of llama.cpp's tests/test-chat-template.cpp (a C
      string literal, unescaped here); a substitute tokenizer: Phi-4's 100k tiktoken-style BPE is not in the
      sdist, so this is GPT-2's byte-level BPE (ggml-vocab-gpt-2.gguf, the same kind, tokenizer_class
      GPT2Tokenizer, which makes llama.cpp's Phi-3 converter read it as BPE) plus <|im_start|> <|im_end|>
      <|im_sep|> as special tokens at ids 50257-50259; bos <|endoftext|> (not added), eos <|im_end|>, config
      vocab 50304 (padded to a multiple of 64, as Phi-4's 100352); arch phi3 with grouped-query attention.

    There is no mistral-v0.3 family: the sdist has no Mistral-7B-Instruct-v0.3 chat template.
    The weights are random float32 (`seed`); the embeddings dominate the size: 33 MB per 128k-token
    matrix at hidden size 64.

    `eos_override` makes another token the tokenizer's (and config.json's) eos; `generation_eos`
    replaces generation_config.json's eos list; both name tokens by their text. `chat_template` is the
    template for a family whose template the sdist lacks (ValueError without it); it replaces any other's.
    """
    import torch
    import transformers

    spec = FAMILY_SPECS.get(family)
    if spec is None:
        raise ValueError(f"unknown chat family {family!r}; choose from {', '.join(FAMILIES)}")
    from .external.llamacpp import locate_llama_cpp_models

    template_name = f"templates/{spec.template}" if spec.template and chat_template is None else None
    files = locate_llama_cpp_models([spec.vocab, *([template_name] if template_name else [])])
    if chat_template is not None:
        template = chat_template
    elif template_name:
        template = files[template_name].read_text(encoding="utf-8")
    elif spec.template_case:
        template = chat_template_case(spec.template_case)
    else:
        raise ValueError(f"the {family} family's chat template is not in the llama.cpp sources: "
                         "pass it as chat_template")
    eos = eos_override or spec.eos
    generation_eos = list(spec.generation_eos if generation_eos is None else generation_eos)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _write_family_tokenizer(out_dir, spec, files[spec.vocab], template, eos, generation_eos)
    vocab_size = spec.vocab_size or len(ids)
    eos_id, generation_eos_ids = ids[eos], [ids[t] for t in generation_eos]
    bos_id = ids[spec.bos or spec.pad or spec.eos]  # Qwen2.5 has no bos token; its config says <|endoftext|>
    pad_id = ids[spec.pad] if spec.pad else None

    config = tiny_config(spec.arch, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                         num_kv_heads=spec.num_kv_heads, tie_word_embeddings=spec.tie_word_embeddings,
                         rope_theta=spec.rope_theta)
    config.vocab_size = vocab_size
    config.max_position_embeddings = spec.max_position_embeddings
    if spec.rope_scaling:
        if hasattr(config, "rope_parameters"):  # transformers 5
            config.rope_parameters = {**config.rope_parameters, **spec.rope_scaling}
        else:
            config.rope_scaling = dict(spec.rope_scaling)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = bos_id, eos_id, pad_id
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos_id, eos_token_id=generation_eos_ids if len(generation_eos_ids) != 1 else generation_eos_ids[0],
        pad_token_id=pad_id)
    model.save_pretrained(out_dir)
    return out_dir


_C_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]+|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{1,3}|.)", re.DOTALL)
_C_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _c_unescape(literal: str) -> str:
    """The text of a C string literal's body (UTF-8 source, escapes as C++ reads them)."""
    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code[0] in "xuU":
            return chr(int(code[1:], 16))
        if code[0] in "01234567":
            return chr(int(code, 8))
        return _C_SIMPLE_ESCAPES.get(code, code)  # \\ \" \' \? stand for themselves

    return _C_ESCAPE.sub(one, literal)


def chat_template_case(name: str) -> str:
    """The template_str of the case `name` of llama.cpp's tests/test-chat-template.cpp (adjacent string
    literals joined), the source of chat templates that models/templates/ lacks (microsoft/phi-4's)."""
    from .external.llamacpp import locate_llama_cpp_models

    file = "test-chat-template.cpp"
    source = locate_llama_cpp_models([file], directory="tests")[file].read_text(encoding="utf-8")
    literal = r'"((?:[^"\\\n]|\\.)*)"'
    case = re.search(r'/\*\s*\.name=\s*\*/\s*"' + re.escape(name) + r'",\s*/\*\s*\.template_str=\s*\*/\s*'
                     r'((?:' + literal + r'\s*)+),', source)
    if case is None:
        raise ValueError(f"llama.cpp's tests/{file} has no case named {name!r} with a plain string template")
    return "".join(_c_unescape(body) for body in re.findall(literal, case.group(1)))


@functools.lru_cache(maxsize=8)  # every vocabulary GGUF of FAMILY_SPECS (5) fits
def _gguf_tokenizer(vocab_gguf: Path) -> tuple[str, str | None]:
    """The tokenizer transformers reads from a vocabulary GGUF: (its tokenizer.json text, its unk token).
    Slow for a large vocabulary (transformers parses the file twice), so once per file and process."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(vocab_gguf.parent), gguf_file=vocab_gguf.name)
    return str(tokenizer.backend_tokenizer.to_str()), tokenizer.unk_token


def _sentencepiece_pieces(vocab_gguf: Path, n: int) -> tuple[list[float], list[int]]:
    """The scores and token types of a SentencePiece vocabulary GGUF's first n tokens."""
    from gguf import GGUFReader

    fields = GGUFReader(vocab_gguf).fields
    scores = [float(s) for s in fields["tokenizer.ggml.scores"].contents()[:n]]
    types = [int(t) for t in fields["tokenizer.ggml.token_type"].contents()[:n]]
    return scores, types


def _write_family_tokenizer(out_dir: Path, spec: ChatFamily, vocab_gguf: Path, template: str, eos: str,
                            generation_eos: list[str]) -> dict[str, int]:
    """Write the family's tokenizer files; return the ids of all its tokens by text.

    `eos` and `generation_eos` must name special or added tokens; that is checked before anything is written.
    """
    import transformers
    from tokenizers import Tokenizer

    tokenizer_json, unk = _gguf_tokenizer(vocab_gguf)
    data = json.loads(tokenizer_json)
    # Keep the file's own tokens only: the GGUF pads to its model's vocab size with [PADn] tokens that are
    # no tokens at all, and transformers adds GPT-2's <|endoftext|> to a byte-level vocabulary without it.
    by_id = {i: token for token, i in data["model"]["vocab"].items()}
    n_base = len(by_id)
    while n_base and _PAD_TOKEN.fullmatch(by_id[n_base - 1]):
        n_base -= 1
    if sorted(by_id)[:n_base] != list(range(n_base)):
        raise ValueError(f"{vocab_gguf.name}: token ids are not 0..{n_base - 1}")
    by_id = {i: token for i, token in by_id.items() if i < n_base} | dict(spec.renamed)
    vocab = {token: i for i, token in by_id.items()}
    if len(vocab) != n_base:
        raise ValueError(f"{vocab_gguf.name}: two tokens have one name after renaming")
    added = [t | {"content": by_id[t["id"]]} for t in data["added_tokens"] if t["id"] < n_base]
    for offset, (text, special) in enumerate(spec.added):
        vocab[text] = n_base + offset
        added.append({"id": n_base + offset, "content": text, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": special})
    for token in added:
        token["rstrip"] = token["content"] in spec.rstrip
    data["model"]["vocab"] = vocab
    data["added_tokens"] = added
    if (data.get("pre_tokenizer") or {}).get("type") == "Metaspace":
        # transformers' Metaspace marks only the start of the whole text as a word start; llama.cpp (and
        # Llama 2's own tokenizer.json) the start of every piece of text, the one after [INST] too. Use
        # Llama 2's form, so that both tokenize a rendered conversation alike; Gemma's (no dummy prefix at all)
        # for a family without one.
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        data["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"}, replace]} if spec.space_prefix else replace
        data["pre_tokenizer"] = None
    bos = [{"SpecialToken": {"id": spec.bos, "type_id": 0}}] if spec.add_bos and spec.bos else []
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [*bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [*bos, {"Sequence": {"id": "A", "type_id": 0}}, *bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {spec.bos: {"id": spec.bos, "ids": [vocab[spec.bos]], "tokens": [spec.bos]}} if bos else {},
    }
    added_texts = {t["content"] for t in added}
    for token in [eos, *generation_eos]:
        if token not in added_texts:
            raise ValueError(f"{token!r} is not one of the special or added tokens of the {spec.vocab} tokenizer")
    if spec.vocab_size is not None and spec.vocab_size < len(vocab):
        raise ValueError(f"{spec.vocab}: {len(vocab)} tokens do not fit vocab_size {spec.vocab_size}")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token=spec.bos, eos_token=eos,
        unk_token=unk, pad_token=spec.pad)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("backend", "is_local", "local_files_only", "chat_template"):
        config.pop(key, None)
    config.update({
        "tokenizer_class": spec.tokenizer_class,
        "add_bos_token": spec.add_bos,
        "add_eos_token": False,
        "bos_token": spec.bos,
        "eos_token": eos,
        "pad_token": spec.pad,
        "unk_token": unk,
        "model_max_length": spec.model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        "chat_template": template,
    })
    _write_json(out_dir / "tokenizer_config.json", config)
    if spec.sentencepiece:
        scores, types = _sentencepiece_pieces(vocab_gguf, n_base)
        _write_sentencepiece_model(out_dir / "tokenizer.model", [by_id[i] for i in range(n_base)], scores, types,
                                   dummy_prefix=spec.space_prefix)
    return vocab


def _write_sentencepiece_model(path: Path, tokens: list[str], scores: list[float], types: list[int], *,
                               dummy_prefix: bool = True) -> None:
    """A SentencePiece BPE model of exactly these pieces, set up as Llama 2's (the shape of every
    SentencePiece vocabulary GGUF used here): byte fallback, a dummy prefix (unless not), no normalization."""
    from sentencepiece import sentencepiece_model_pb2

    sp_pb2: Any = sentencepiece_model_pb2  # protobuf-generated: its classes are invisible to mypy
    model = sp_pb2.ModelProto()
    for text, score, kind in zip(tokens, scores, types, strict=True):
        model.pieces.add(piece=text, score=score, type=kind)  # GGUF token types are SentencePiece's
    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = dummy_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    path.write_bytes(model.SerializeToString())


SO8T_SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
TRIALITY_REPS = ("vector", "spinor_plus", "spinor_minus")


def write_random_so8t_adapter(out_dir: Path, hidden_size: int, num_layers: int, *, seed: int = 0,
                              sites: tuple[str, ...] = SO8T_SITES, triality: tuple[str, ...] = TRIALITY_REPS,
                              final: bool = True, strength: float = 0.3,
                              base_model: str | None = None) -> Path:
    """Write an SO8T v1 adapter with random generators and gates for every requested group."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    blocks = hidden_size // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    tensors: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        for site in sites:
            tensors[f"layers.{layer}.{site}.generator"] = strength * randn(blocks, 8, 8)
            tensors[f"layers.{layer}.{site}.gate"] = randn()
        for rep in triality:
            prefix = f"layers.{layer}.triality.{rep}"
            tensors[f"{prefix}.projector"] = randn(8, hidden_size) / hidden_size**0.5
            tensors[f"{prefix}.generator"] = strength * randn(8, 8)
            tensors[f"{prefix}.gate"] = randn()
    if final:
        tensors["final.generator"] = strength * randn(blocks, 8, 8)
        tensors["final.gate"] = randn()

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "so8t_adapter.safetensors"))
    config = {"format": "so8t", "format_version": 1, "block_size": 8,
              "hidden_size": hidden_size, "num_hidden_layers": num_layers}
    if base_model:
        config["base_model"] = base_model
    _write_json(out_dir / "so8t_config.json", config)
    return out_dir


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
