"""Tiny, real Hugging Face models and SO8T adapters, built on the spot.

Nothing here downloads anything: `demo init` and the test fixtures use these builders to
make models that transformers loads and llama.cpp's converter accepts as the real thing.
Heavy imports (torch, transformers, sentencepiece) happen inside the functions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
                num_kv_heads: int | None = None, tie_word_embeddings: bool = False, **extra):
    """A transformers config of the given architecture with real-model structure and tiny sizes.

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
        tie_word_embeddings=tie_word_embeddings,
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
    raise ValueError(f"no tiny config for architecture {arch!r}")


def write_tiny_model(out_dir: Path, arch: str = "phi3", *, seed: int = 0, dtype: str = "float32",
                     max_shard_size: str | None = None, **config_kwargs) -> Path:
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
