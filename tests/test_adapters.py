"""Adapters: LoRA against PEFT's own merge, chaining order, and one test per bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from so8t_deploy.bake.adapters import AdapterSpec
from so8t_deploy.bake.bake import bake_model
from so8t_deploy.bake.verify import verify_bake
from so8t_deploy.manifest.schema import Scales


def make_lora(model_dir, out_dir, target_modules, seed=0, **config):
    """A PEFT LoRA with non-zero B (PEFT's default init would make B A = 0)."""
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    options = {"r": 4, "lora_alpha": 8, **config}
    lora = peft.LoraConfig(target_modules=target_modules, init_lora_weights=False, **options)
    peft.get_peft_model(model, lora).save_pretrained(out_dir)
    return out_dir


def peft_merged_logits(model_dir, lora_dir, tokens):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    merged = peft.PeftModel.from_pretrained(model, lora_dir).merge_and_unload().eval()
    with torch.no_grad():
        return merged(tokens).logits


def baked_logits(baked_dir, tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(baked_dir).eval()
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("arch", "targets", "config"),
    [
        ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {}),
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}),
        ("llama", ["q_proj", "v_proj"], {"use_rslora": True, "lora_alpha": 16}),
        ("qwen2", ["q_proj", "down_proj"], {"fan_in_fan_out": True}),
    ],
    ids=["phi3-fused", "llama-separate", "llama-rslora", "qwen2-fan-in-fan-out"],
)
def test_lora_matches_peft_merge_and_unload(tiny_model, tmp_path, arch, targets, config):
    model = tiny_model(arch)
    lora = make_lora(model, tmp_path / "lora", targets, **config)
    bake_model(model, [(None, lora)], tmp_path / "baked", Scales())
    expected = peft_merged_logits(model, lora, TOKENS)
    got = baked_logits(tmp_path / "baked", TOKENS)
    base = baked_logits(model, TOKENS)
    assert (got - expected).abs().max() < 1e-4
    assert (expected - base).abs().max() > 1e-2  # the LoRA matters


def test_separate_lora_names_fold_into_phi3_fused_rows(tiny_model, tmp_path):
    """A LoRA trained on separate q/k/v/gate/up names lands in the matching rows of the fused weights."""
    llama_shaped = make_lora(tiny_model("llama", num_kv_heads=2), tmp_path / "lora",
                             ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    phi3 = tiny_model("phi3", num_kv_heads=2)
    spec = AdapterSpec(None, llama_shaped, allow_base_mismatch=True)  # trained on another model, on purpose
    bake_model(phi3, [spec], tmp_path / "baked", Scales())
    report = verify_bake(phi3, [spec], tmp_path / "baked", Scales())
    assert report.max_abs_diff < 1e-4 and report.adapter_effect > 1e-2


def test_adapters_chain_in_the_given_order(tiny_model, so8t_adapter, tmp_path, run_cli):
    model = tiny_model("phi3")
    so8t, lora = so8t_adapter(64, 2), make_lora(model, tmp_path / "lora", ["qkv_proj", "down_proj"])
    out = tmp_path / "baked"
    assert run_cli("bake", "--model", model, "--adapter", so8t, "--adapter", lora, "--out", out).code == 0
    in_order = verify_bake(model, [(None, so8t), (None, lora)], out, Scales())
    swapped = verify_bake(model, [(None, lora), (None, so8t)], out, Scales())
    assert in_order.max_abs_diff < 1e-4
    assert swapped.max_abs_diff > 1e-2  # LoRA-then-SO8T is a different model
    result = run_cli("verify", "--model", model, "--adapter", lora, "--adapter", so8t, "--baked", out)
    assert result.code == 1


# ---------------------------------------------------------------- bad SO8T adapters


def mutate_so8t(src, dst, *, config=None, drop=(), add=None, replace=None):
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "so8t_config.json").read_text())
        for key, value in config.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        (dst / "so8t_config.json").write_text(json.dumps(data))
    tensors = load_file(dst / "so8t_adapter.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    tensors.update(replace or {})
    save_file(tensors, dst / "so8t_adapter.safetensors")
    return dst


BAD_SO8T = {
    "wrong-format": ({"config": {"format": "lora"}}, "so8t_config.json: format: must be 'so8t'"),
    "wrong-version": ({"config": {"format_version": 2}}, "format_version: must be 1"),
    "wrong-block-size": ({"config": {"block_size": 16}}, "block_size: must be 8"),
    "missing-hidden-size": ({"config": {"hidden_size": None}}, "hidden_size: required key is missing"),
    "bool-hidden-size": ({"config": {"hidden_size": True}}, "hidden_size: must be a positive integer"),
    "missing-format": ({"config": {"format": None}}, "format: required key is missing"),
    "hidden-not-divisible-by-8": ({"config": {"hidden_size": 60}}, "hidden_size: 60 is not divisible by 8"),
    "hidden-size-mismatch": ({"hidden": 128}, "hidden_size 128 does not match the base model's 64"),
    "layers-mismatch": ({"config": {"num_hidden_layers": 3}}, "num_hidden_layers 3 does not match"),
    "base-model-mismatch": ({"config": {"base_model": "org/other-model"}}, "base_model 'org/other-model'"),
    "unknown-config-key": ({"config": {"rank": 8}}, "rank: unknown key"),
    "unknown-tensor": ({"add": {"layers.0.attn_in.bias": torch.zeros(8)}}, "unknown tensor 'layers.0.attn_in.bias'"),
    "unknown-site": ({"add": {"layers.0.attn_mid.gate": torch.zeros(())}}, "unknown tensor 'layers.0.attn_mid.gate'"),
    "wrong-generator-shape": ({"replace": {"layers.0.attn_in.generator": torch.zeros(4, 8, 8)}},
                              "'layers.0.attn_in.generator' has shape [4, 8, 8], expected [8, 8, 8]"),
    "wrong-projector-shape": ({"replace": {"layers.1.triality.vector.projector": torch.zeros(8, 32)}},
                              "'layers.1.triality.vector.projector' has shape [8, 32]"),
    "wrong-dtype": ({"replace": {"final.gate": torch.zeros((), dtype=torch.float16)}}, "'final.gate' must be float32"),
    "partial-site-group": ({"drop": ["layers.1.mlp_out.gate"]},
                           "partial group 'layers.1.mlp_out': missing layers.1.mlp_out.gate"),
    "partial-triality-group": ({"drop": ["layers.0.triality.spinor_plus.projector"]},
                               "partial group 'layers.0.triality.spinor_plus'"),
    "partial-final-group": ({"drop": ["final.generator"]}, "partial group 'final'"),
    "layer-out-of-range": ({"add": {"layers.5.attn_in.generator": torch.zeros(8, 8, 8),
                                    "layers.5.attn_in.gate": torch.zeros(())}}, "tensors for layer 5"),
    "nan-values": ({"replace": {"layers.0.mlp_in.gate": torch.tensor(float("nan"))}}, "contains NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_SO8T), ids=str)
def test_bad_so8t_adapter_is_exit_2_and_names_the_problem(tiny_model, so8t_adapter, tmp_path, run_cli, case):
    changes, message = dict(BAD_SO8T[case][0]), BAD_SO8T[case][1]
    model = tiny_model("phi3")
    source = so8t_adapter(changes.pop("hidden", 64), 2)
    adapter = mutate_so8t(source, tmp_path / "adapter", **changes)
    result = run_cli("bake", "--model", model, "--adapter", adapter, "--out", tmp_path / "out")
    assert result.code == 2, result.err
    assert message in result.err and str(adapter) in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_truncated_adapter_file(tiny_model, so8t_adapter, tmp_path, run_cli):
    adapter = shutil.copytree(so8t_adapter(64, 2), tmp_path / "adapter")
    weights = adapter / "so8t_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = run_cli("bake", "--model", tiny_model("phi3"), "--adapter", adapter, "--out", tmp_path / "out")
    assert result.code == 2 and "truncated" in result.err and str(weights) in result.err


def test_not_an_adapter_directory(tiny_model, tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    result = run_cli("bake", "--model", tiny_model("phi3"), "--adapter", tmp_path / "empty", "--out", tmp_path / "o")
    assert result.code == 2 and "not an adapter" in result.err


# ---------------------------------------------------------------- bad LoRA adapters


def mutate_lora(src, dst, *, config=None, add=None, drop=(), replace=None):
    shutil.copytree(src, dst)
    data = json.loads((dst / "adapter_config.json").read_text())
    data.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(data))
    tensors = load_file(dst / "adapter_model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    tensors.update(replace or {})
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


QKV_A = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"
QKV = "base_model.model.model.layers.0.self_attn.qkv_proj"
LAYERS = "base_model.model.model.layers"
BAD_LORA = {
    # refused by name: what no plain checkpoint can hold, and what we do not fold
    "activated-lora": ({"config": {"alora_invocation_tokens": [5, 6]}}, "alora_invocation_tokens: not supported"),
    "layer-replication": ({"config": {"layer_replication": [[0, 2]]}}, "layer_replication: not supported"),
    "trainable-tokens": ({"config": {"trainable_token_indices": [3]}}, "trainable_token_indices: not supported"),
    "target-parameters": ({"config": {"target_parameters": ["mlp.experts"]}}, "target_parameters: not supported"),
    "pissa": ({"config": {"init_lora_weights": "pissa_niter_4"}}, "init_lora_weights: 'pissa_niter_4' changes the"),
    "unknown-option": ({"config": {"use_fancy_lora": True}}, "use_fancy_lora: unknown PEFT option with a value"),
    "not-lora": ({"config": {"peft_type": "IA3"}}, "peft_type: only LORA"),
    # config values
    "bad-rank": ({"config": {"r": 0}}, "r: must be a positive integer"),
    "bool-alpha": ({"config": {"lora_alpha": True}}, "lora_alpha: must be a number"),
    "bad-bias-mode": ({"config": {"bias": "some"}}, "bias: must be 'none', 'all' or 'lora_only'"),
    "bad-pattern": ({"config": {"rank_pattern": {"q_proj(": 8}}},
                    "rank_pattern: key 'q_proj(' is not a valid regular expression"),
    "rank-mismatch": ({"config": {"r": 8}}, "config r is 8"),
    "rank-pattern-mismatch": ({"config": {"rank_pattern": {"qkv_proj": 8}}}, "config r is 8 (rank_pattern)"),
    # tensors that disagree with the config or the base
    "dora-without-magnitude": ({"config": {"use_dora": True}}, "has no DoRA magnitude"),
    "magnitude-without-dora": ({"add": {f"{QKV}.lora_magnitude_vector": torch.ones(192)}},
                               "has a DoRA magnitude, but use_dora is false"),
    "magnitude-shape": ({"config": {"use_dora": True},
                         "add": {f"{QKV}.lora_magnitude_vector": torch.ones(64),
                                 f"{LAYERS}.0.self_attn.o_proj.lora_magnitude_vector": torch.ones(64),
                                 f"{LAYERS}.1.self_attn.qkv_proj.lora_magnitude_vector": torch.ones(192),
                                 f"{LAYERS}.1.self_attn.o_proj.lora_magnitude_vector": torch.ones(64)}},
                        "lora_magnitude_vector of 'model.layers.0.self_attn.qkv_proj' has shape [64], expected [192]"),
    "lora-bias-without-flag": ({"add": {f"{QKV}.lora_B.bias": torch.ones(192)}}, "lora_bias is false"),
    "lora-bias-on-phi3": ({"config": {"lora_bias": True}, "add": {f"{QKV}.lora_B.bias": torch.ones(192)}},
                          "phi3 has no bias on that projection and no config flag that adds one"),
    "embedding-partial-pair": ({"add": {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 320)}},
                               "has no lora_embedding_B"),
    "embedding-wrong-vocab": ({"add": {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 300),
                                       "base_model.model.model.embed_tokens.lora_embedding_B": torch.ones(64, 4)}},
                              "embedding LoRA for 'model.embed_tokens' has shape [300, 64], expected [320, 64]"),
    "saved-module-wrong-shape": ({"add": {"base_model.model.model.norm.weight": torch.ones(32)}},
                                 "'model.norm.weight' has shape [32], the base model's is [64]"),
    "saved-unknown-module": ({"add": {"base_model.model.model.rotary.weight": torch.ones(32)}},
                             "replaces 'model.rotary.weight', which the base model does not have"),
    "saved-nan": ({"add": {"base_model.model.model.norm.weight": torch.full((64,), float("nan"))}},
                  "contains NaN or infinity"),
    "unsupported-tensor": ({"add": {f"{QKV}.lora_C.weight": torch.ones(4, 4)}}, "unsupported tensor"),
    "partial-pair": ({"drop": [f"{QKV}.lora_B.weight"]}, "has no lora_B"),
    "unknown-module": ({"add": {"base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": torch.ones(4, 64),
                                "base_model.model.model.layers.0.self_attn.rotary.lora_B.weight": torch.ones(64, 4)}},
                       "LoRA targets 'model.layers.0.self_attn.rotary'"),
    "wrong-shape": ({"replace": {QKV_A: torch.ones(4, 32)}}, "expected [192, 64]"),
    "base-model-mismatch": ({"config": {"base_model_name_or_path": "org/other-model"}},
                            "base_model_name_or_path 'org/other-model' does not match the base model"),
}


@pytest.fixture(scope="module")
def phi3_lora(tiny_model, tmp_path_factory):
    return make_lora(tiny_model("phi3"), tmp_path_factory.mktemp("lora") / "lora", ["qkv_proj", "o_proj"])


@pytest.mark.parametrize("case", sorted(BAD_LORA), ids=str)
def test_bad_lora_adapter_is_exit_2_and_names_the_problem(tiny_model, phi3_lora, tmp_path, run_cli, case):
    changes, message = BAD_LORA[case]
    adapter = mutate_lora(phi3_lora, tmp_path / "lora", **changes)
    result = run_cli("bake", "--model", tiny_model("phi3"), "--adapter", adapter, "--out", tmp_path / "out")
    assert result.code == 2, result.err
    assert message in result.err and str(adapter) in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_pickled_adapter_is_never_loaded(tiny_model, phi3_lora, tmp_path, run_cli):
    adapter = shutil.copytree(phi3_lora, tmp_path / "lora")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    result = run_cli("bake", "--model", tiny_model("phi3"), "--adapter", adapter, "--out", tmp_path / "out")
    assert result.code == 2 and "adapter_model.bin: a pickle, which is never loaded" in result.err


# ---------------------------------------------------------------- bad model directories


def test_missing_shard(tiny_model, so8t_adapter, tmp_path, run_cli):
    model = shutil.copytree(tiny_model("phi3", max_shard_size="60KB"), tmp_path / "model")
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    result = run_cli("bake", "--model", model, "--adapter", so8t_adapter(64, 2), "--out", tmp_path / "o")
    assert result.code == 2 and f"{shard}: missing shard" in result.err


def test_truncated_model_shard(tiny_model, so8t_adapter, tmp_path, run_cli):
    model = shutil.copytree(tiny_model("phi3"), tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    result = run_cli("bake", "--model", model, "--adapter", so8t_adapter(64, 2), "--out", tmp_path / "o")
    assert result.code == 2 and f"{weights}: truncated safetensors file" in result.err
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tiny_model, so8t_adapter, tmp_path, run_cli):
    model = shutil.copytree(tiny_model("phi3"), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(config))
    result = run_cli("bake", "--model", model, "--adapter", so8t_adapter(64, 2), "--out", tmp_path / "o")
    assert result.code == 2 and "unsupported architecture 'gpt2'" in result.err


def test_missing_model_directory(so8t_adapter, tmp_path, run_cli):
    result = run_cli("bake", "--model", tmp_path / "nope", "--adapter", so8t_adapter(64, 2), "--out", tmp_path / "o")
    assert result.code == 2 and "not a model directory" in result.err
