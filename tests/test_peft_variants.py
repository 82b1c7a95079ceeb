"""Every PEFT LoRA variant we fold, saved by PEFT itself, baked by the CLI, checked against PEFT's forward.

Each adapter is made the way a user's training run makes it: `get_peft_model(...)` on a tiny
Llama or Phi-3, every trainable weight perturbed (so B != 0, DoRA magnitudes move, saved
modules and biases differ from the base), `save_pretrained`. The reference is PEFT's own
forward of the unmerged model, loaded back from disk; the bake must match it to 1e-4 in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch

from so8t_deploy.bake.adapters import AdapterSpec
from so8t_deploy.bake.bake import PROVENANCE_FILE, bake_model
from so8t_deploy.bake.model_dir import open_model_dir
from so8t_deploy.bake.verify import verify_bake
from so8t_deploy.manifest.schema import Scales

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_LINEAR = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
NEW_TOKENS = [f"<tool_{i}>" for i in range(20)]  # 305 + 20 tokens: past the tiny models' 320 rows


def save_peft_adapter(model_dir, out_dir, *, new_tokens=(), seed=0, **config):
    """What a training run leaves: a PEFT adapter with every trainable weight moved, saved by PEFT."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if new_tokens:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        tokenizer.add_tokens(list(new_tokens))
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
        tokenizer.save_pretrained(out_dir)
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **config))
    with torch.no_grad():
        for _, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_logits(model_dir, adapter_dir, tokens):
    """PEFT's forward of the unmerged adapter model, as a user would load it back."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    rows = _saved_embedding_rows(adapter_dir)
    if rows and rows != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(rows)
    assert saved["peft_type"] == "LORA"
    reference = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return reference(tokens).logits


def _saved_embedding_rows(adapter_dir):
    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            if key.startswith("base_model.model.model.embed_tokens.") and key.endswith("weight"):
                return f.get_slice(key).get_shape()[0]
    return None


def hf_logits(model_dir, tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def probe(vocab):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(5))


CASES = {
    "llama-dora": ("llama", {}, {"target_modules": LLAMA_LINEAR, "use_dora": True}),
    "phi3-dora": ("phi3", {"num_kv_heads": 2}, {"target_modules": PHI3_LINEAR, "use_dora": True}),
    "llama-dora-embedding": ("llama", {}, {"target_modules": ["embed_tokens", "q_proj"], "use_dora": True}),
    "llama-rank-alpha-pattern": ("llama", {}, {
        "target_modules": LLAMA_LINEAR,
        "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 8, "down_proj": 2},
        "alpha_pattern": {"o_proj": 32, r"layers\.1\..*_proj": 3}}),
    "phi3-rank-alpha-pattern-rslora": ("phi3", {}, {
        "target_modules": PHI3_LINEAR, "use_rslora": True,
        "rank_pattern": {"qkv_proj": 8}, "alpha_pattern": {r"model\.layers\.1\.mlp\.down_proj": 2}}),
    "llama-modules-to-save": ("llama", {}, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    "llama-tied-modules-to-save": ("llama", {"tie_word_embeddings": True},
                                   {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "phi3-modules-to-save-norms": ("phi3", {}, {"target_modules": PHI3_LINEAR, "modules_to_save": ["lm_head", "norm"]}),
    "llama-tied-embedding": ("llama", {"tie_word_embeddings": True},
                             {"target_modules": ["embed_tokens", "q_proj", "down_proj"]}),
    "phi3-embedding": ("phi3", {}, {"target_modules": ["embed_tokens", "qkv_proj"]}),
    "llama-lora-bias-creates-biases": ("llama", {}, {"target_modules": ["q_proj", "o_proj", "down_proj"],
                                                     "lora_bias": True}),
    "llama-trained-biases-all": ("llama", {"attention_bias": True},
                                 {"target_modules": ["q_proj", "v_proj"], "bias": "all"}),
    "llama-lora-only-biases-and-lora-bias": ("llama", {"attention_bias": True, "mlp_bias": True},
                                             {"target_modules": ["k_proj", "down_proj"], "bias": "lora_only",
                                              "lora_bias": True}),
}
RESIZED = {
    "llama-tied-resized-embedding-lora": ("llama", {"tie_word_embeddings": True},
                                          {"target_modules": ["embed_tokens", "q_proj"]}),
    "llama-resized-untargeted": ("llama", {}, {"target_modules": ["q_proj"]}),
    "llama-tied-resized-untargeted": ("llama", {"tie_word_embeddings": True}, {"target_modules": ["q_proj"]}),
    "phi3-resized-embedding-and-head": ("phi3", {}, {"target_modules": ["embed_tokens", "qkv_proj"],
                                                     "modules_to_save": ["lm_head"]}),
}


def bake_and_compare(tiny_model, run_cli, tmp_path, arch, model_kwargs, config, new_tokens=()):
    model = tiny_model(arch, **model_kwargs)
    adapter = save_peft_adapter(model, tmp_path / "adapter", new_tokens=new_tokens, **config)
    out = tmp_path / "baked"
    result = run_cli("bake", "--model", model, "--adapter", adapter, "--out", out)
    assert result.code == 0, result.err
    vocab = open_model_dir(out).config["vocab_size"]
    tokens = probe(vocab)
    expected, got = peft_logits(model, adapter, tokens), hf_logits(out, tokens)
    assert (got - expected).abs().max() <= 1e-4
    base = hf_logits(model, tokens.clamp(max=319))
    assert (expected[..., :320] - base[..., :320]).abs().max() > 1e-2  # the adapter matters
    return model, adapter, out


@pytest.mark.parametrize("case", sorted(CASES), ids=str)
def test_variant_matches_peft_forward(tiny_model, run_cli, tmp_path, case):
    arch, model_kwargs, config = CASES[case]
    model, adapter, out = bake_and_compare(tiny_model, run_cli, tmp_path, arch, model_kwargs, config)
    assert verify_bake(model, [(None, adapter)], out, Scales()).max_abs_diff <= 1e-4  # verify agrees


@pytest.mark.parametrize("case", sorted(RESIZED), ids=str)
def test_resized_vocabulary_matches_peft_forward(tiny_model, run_cli, tmp_path, case):
    arch, model_kwargs, config = RESIZED[case]
    model, adapter, out = bake_and_compare(tiny_model, run_cli, tmp_path, arch, model_kwargs, config, NEW_TOKENS)
    baked = open_model_dir(out)
    assert baked.config["vocab_size"] == 328  # 325 tokens, padded to a multiple of 8
    assert json.loads((out / "tokenizer_config.json").read_text()) == json.loads(
        (adapter / "tokenizer_config.json").read_text())  # the adapter's tokenizer ships
    names = baked.tensor_names
    assert ("lm_head.weight" in names) == (model_kwargs.get("tie_word_embeddings") is not True or
                                           "embed_tokens" in config["target_modules"])
    assert verify_bake(model, [(None, adapter)], out, Scales()).max_abs_diff <= 1e-4


def test_lora_bias_switches_on_the_llama_bias_flags(tiny_model, run_cli, tmp_path):
    _, _, out = bake_and_compare(tiny_model, run_cli, tmp_path, *CASES["llama-lora-bias-creates-biases"])
    baked = open_model_dir(out)
    assert baked.config["attention_bias"] is True and baked.config["mlp_bias"] is True
    biases = {name for name in baked.tensor_names if name.endswith(".bias")}
    assert len(biases) == 2 * 7  # every projection of both layers, zeros where the adapter had none
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["config_updates"] == {"attention_bias": True, "mlp_bias": True}


def test_resized_vocabulary_without_its_tokenizer_is_refused(tiny_model, run_cli, tmp_path):
    model = tiny_model("llama")
    adapter = save_peft_adapter(model, tmp_path / "adapter", new_tokens=NEW_TOKENS, target_modules=["q_proj"])
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.jinja"):
        (adapter / name).unlink(missing_ok=True)
    result = run_cli("bake", "--model", model, "--adapter", adapter, "--out", tmp_path / "out")
    assert result.code == 2
    assert "grow from 320 to 328 rows" in result.err and "save the tokenizer with the adapter" in result.err
    assert not (tmp_path / "out").exists()


def test_stack_lora_so8t_lora_is_exact_in_order(tiny_model, so8t_adapter, run_cli, tmp_path):
    """DoRA, then SO8T, then LoRA with an embedding and a saved head: each on top of the previous ones."""
    model = tiny_model("phi3", num_kv_heads=2)
    first = save_peft_adapter(model, tmp_path / "dora", seed=1, target_modules=PHI3_LINEAR, use_dora=True)
    so8t = so8t_adapter(64, 2)
    last = save_peft_adapter(model, tmp_path / "lora", seed=2, target_modules=["embed_tokens", "qkv_proj", "o_proj"],
                             modules_to_save=["lm_head"])
    out = tmp_path / "baked"
    result = run_cli("bake", "--model", model, "--adapter", first, "--adapter", so8t, "--adapter", last, "--out", out)
    assert result.code == 0, result.err
    chain = [(None, first), (None, so8t), (None, last)]
    report = verify_bake(model, chain, out, Scales())
    assert report.max_abs_diff <= 1e-4 and report.adapter_effect > 1e-1, report
    swapped = verify_bake(model, [(None, last), (None, so8t), (None, first)], out, Scales())
    assert swapped.max_abs_diff > 1e-2
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert [(a["position"], a["kind"], a["path"]) for a in provenance["adapters"]] == [
        (0, "lora", str(first)), (1, "so8t", str(so8t)), (2, "lora", str(last))]
    assert provenance["adapters"][0]["features"] == ["dora"]


def test_stack_on_llama_with_patterns_and_dora(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    first = save_peft_adapter(model, tmp_path / "a", seed=3, target_modules=LLAMA_LINEAR,
                              rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16})
    last = save_peft_adapter(model, tmp_path / "b", seed=4, target_modules=["embed_tokens", "q_proj", "lm_head"],
                             use_dora=True)
    chain = [(None, first), (None, so8t_adapter(64, 2)), (None, last)]
    bake_model(model, chain, tmp_path / "baked", Scales())
    report = verify_bake(model, chain, tmp_path / "baked", Scales())
    assert report.max_abs_diff <= 1e-4 and report.adapter_effect > 1e-1, report


def test_base_model_mismatch_names_both_and_can_be_allowed(tiny_model, tmp_path, run_cli):
    llama, phi3 = tiny_model("llama", num_kv_heads=2), tiny_model("phi3", num_kv_heads=2)
    adapter = save_peft_adapter(llama, tmp_path / "adapter", target_modules=["q_proj", "up_proj"])
    result = run_cli("bake", "--model", phi3, "--adapter", adapter, "--out", tmp_path / "out")
    assert result.code == 2
    assert f"base_model_name_or_path {str(llama)!r}" in result.err and str(phi3) in result.err
    assert "allow_base_mismatch: true" in result.err
    spec = AdapterSpec("lora", adapter, allow_base_mismatch=True)  # the explicit opt-out
    bake_model(phi3, [spec], tmp_path / "out", Scales())
    assert verify_bake(phi3, [spec], tmp_path / "out", Scales()).passed
    provenance = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert provenance["adapters"][0]["allow_base_mismatch"] is True


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", ["llama-lora-bias-creates-biases", "llama-tied-modules-to-save"])
def test_gguf_of_a_folded_variant_runs_in_llama_cpp(tiny_model, run_cli, tmp_path, case):
    """Created biases and an untied head must survive llama.cpp's converter, not only transformers."""
    from so8t_deploy.external.llamacpp import gguf_logits

    model, adapter, out = bake_and_compare(tiny_model, run_cli, tmp_path, *CASES[case])
    gguf = tmp_path / "model.f32.gguf"
    result = run_cli("convert", out, "--out", gguf, "--outtype", "f32")
    assert result.code == 0, result.err
    tokens = probe(320)[:1]
    expected = peft_logits(model, adapter, tokens)[0].double().numpy()
    got = gguf_logits(gguf, tokens[0].tolist())
    assert abs(got - expected).max() < 1e-3
