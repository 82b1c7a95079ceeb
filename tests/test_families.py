"""Qwen3, Gemma 2, Gemma 3 and Phi-4 (GQA, tied, partial rotary): baked exactly, refused where llama.cpp cannot follow.

Each family is a tiny fp32 model of its real structure with every norm weight random (HF initialises them to
ones or zeros, under which a misplaced fold can hide), a LoRA made by PEFT itself on every linear projection,
and a random SO8T adapter. The bake (the CLI's entry point) must match, within 1e-4 on the logits, both the
unmerged adapter model (bake/reference: SO8T by wrappers, LoRA by PEFT's forward) and PEFT's own
merge_and_unload. The llama.cpp part converts each baked model to an f32 GGUF and compares logits.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from so8t_deploy.bake.layout import layout_from_config
from so8t_deploy.bake.model_dir import open_model_dir
from so8t_deploy.bake.verify import attach_adapters, load_adapters, verify_bake
from so8t_deploy.manifest.schema import Scales

from .test_peft_variants import LLAMA_LINEAR, PHI3_LINEAR, probe, save_peft_adapter

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Family:
    arch: str  # tiny_config's architecture
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    tied: bool | None = None  # None: the family's own default (Gemma ties)
    head_dim: int | None = None  # set apart from hidden/heads, as Qwen3's real configs do
    final: bool = True  # the SO8T adapter has a `final` map (Gemma 2 cannot serve one)
    extra: dict = field(default_factory=dict)

    @property
    def linear(self) -> list[str]:
        return PHI3_LINEAR if self.arch == "phi3" else LLAMA_LINEAR


FAMILIES = {
    "qwen3": Family("qwen3", head_dim=32),  # q/k/v are 128/64/64 rows on a 64-wide model; q_norm/k_norm [32]
    "gemma2": Family("gemma2", final=False),
    "gemma3": Family("gemma3", layers=6),  # five sliding layers, then a global one
    "phi4": Family("phi3", heads=8, kv_heads=2, tied=False),  # Phi-4 14B's shape: 40 heads / 10 kv, untied
    "phi4-mini": Family("phi3", hidden=96, heads=6, kv_heads=2, tied=True,  # 24 heads / 8 kv, tied
                        extra={"partial_rotary_factor": 0.75}),
}


def write_family_base(out_dir: Path, family: Family, seed: int = 0) -> Path:
    """A tiny model of the family, every norm weight random, with the SentencePiece tokenizer the converters read."""
    import transformers

    from so8t_deploy.tiny_models import tiny_config, write_sentencepiece_tokenizer

    config = tiny_config(family.arch, hidden_size=family.hidden, num_layers=family.layers, num_heads=family.heads,
                         num_kv_heads=family.kv_heads, tie_word_embeddings=family.tied, **family.extra)
    if family.head_dim is not None:
        config.head_dim = family.head_dim
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.save_pretrained(out_dir)
    write_sentencepiece_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def family_base(tmp_path_factory):
    cache: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in cache:
            cache[name] = write_family_base(tmp_path_factory.mktemp("families") / name, FAMILIES[name])
        return cache[name]

    return build


@pytest.fixture(scope="session")
def family_adapters(family_base, so8t_adapter, tmp_path_factory):
    """(model, PEFT LoRA on every linear projection, SO8T adapter), once per family."""
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def build(name: str) -> tuple[Path, Path, Path]:
        if name not in cache:
            family, model = FAMILIES[name], family_base(name)
            lora = save_peft_adapter(model, tmp_path_factory.mktemp("lora") / name, target_modules=family.linear)
            so8t = so8t_adapter(family.hidden, family.layers, final=family.final)
            cache[name] = (model, lora, so8t)
        return cache[name]

    return build


@torch.no_grad()
def _hf_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return model(tokens).logits.double()


@torch.no_grad()
def peft_merged_logits(model_dir: Path, lora: Path, so8t: Path | None, tokens: torch.Tensor,
                       untie_first: bool = False) -> torch.Tensor:
    """PEFT's own merge_and_unload, with the SO8T adapter (if any) attached after it by wrappers.

    `untie_first`: give lm_head its own copy of the tied matrix before merging, as PEFT's warning about an
    embedding LoRA on a tied model tells users to (merged into the shared matrix, the head would move too,
    which PEFT's forward never does)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    if untie_first:
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
    merged = peft.PeftModel.from_pretrained(model, lora).merge_and_unload().eval()
    if so8t is not None:
        base = open_model_dir(model_dir)
        layout = layout_from_config(base.config, "config.json")
        attach_adapters(merged, load_adapters([(None, so8t)], base), layout, Scales())
    return merged(tokens).logits.double()


def _bake(run_cli, model: Path, adapters: list[Path], out: Path) -> Path:
    args = [a for adapter in adapters for a in ("--adapter", adapter)]
    result = run_cli("bake", "--model", model, *args, "--out", out)
    assert result.code == 0, result.err
    return out


COMBOS = ["lora", "so8t", "lora+so8t"]


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bake_is_exact(family_adapters, run_cli, tmp_path, name, combo):
    model, lora, so8t = family_adapters(name)
    adapters = {"lora": [lora], "so8t": [so8t], "lora+so8t": [lora, so8t]}[combo]
    out = _bake(run_cli, model, adapters, tmp_path / "baked")
    report = verify_bake(model, [(None, a) for a in adapters], out, Scales())  # (a) the unfolded reference
    assert report.max_abs_diff <= TOLERANCE, report
    assert report.adapter_effect > 0.05, report
    if "lora" in combo:  # (b) PEFT's own merge, SO8T wrapped on top
        tokens = probe(320)
        merged = peft_merged_logits(model, lora, so8t if "so8t" in combo else None, tokens)
        assert (merged - _hf_logits(out, tokens)).abs().max() <= TOLERANCE
    base_tied = json.loads((model / "config.json").read_text())["tie_word_embeddings"]
    unties = base_tied and FAMILIES[name].final and "so8t" in combo  # `final` gives a tied model its own head
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is (base_tied and not unties)


def test_the_families_really_differ_where_it_matters(family_base):
    """The structure the tests rely on is there: q_norm/k_norm, sandwich norms, GQA, head_dim, tying, rotary."""
    shapes = {name: {n: e.shape for s in open_model_dir(family_base(name)).shards for n, e in s.tensors.items()}
              for name in FAMILIES}
    assert shapes["qwen3"]["model.layers.0.self_attn.q_norm.weight"] == (32,)
    assert shapes["qwen3"]["model.layers.0.self_attn.q_proj.weight"] == (128, 64)
    assert shapes["gemma3"]["model.layers.5.self_attn.k_norm.weight"] == (16,)
    for gemma in ("gemma2", "gemma3"):
        assert "model.layers.1.pre_feedforward_layernorm.weight" in shapes[gemma]
        assert "lm_head.weight" not in shapes[gemma]  # tied
    assert shapes["phi4"]["model.layers.0.self_attn.qkv_proj.weight"] == (64 + 2 * 16, 64)  # 8 heads, 2 kv, hd 8
    assert shapes["phi4-mini"]["model.layers.0.self_attn.qkv_proj.weight"] == (96 + 2 * 32, 96)  # hd 16
    assert "lm_head.weight" not in shapes["phi4-mini"]
    gemma3 = json.loads((family_base("gemma3") / "config.json").read_text())
    assert set(gemma3["layer_types"]) == {"sliding_attention", "full_attention"}
    assert json.loads((family_base("phi4-mini") / "config.json").read_text())["rope_parameters"][
        "partial_rotary_factor"] == 0.75


@pytest.mark.parametrize("site", ["attn_in", "vector", "spinor_plus", "spinor_minus"])
def test_input_side_folds_are_exact_past_qwen3_qk_norms(family_base, so8t_adapter, tmp_path, site):
    """Each input-side map alone, strong, on Qwen3 with random q_norm/k_norm: the norm acts after the projection,
    so W <- W M is still exact."""
    import transformers

    model = family_base("qwen3")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(model)
    q_norm = loaded.model.layers[0].self_attn.q_norm.weight
    assert (q_norm - 1).abs().max() > 0.1  # not HF's all-ones init
    sites, triality = ((site,), ()) if site == "attn_in" else ((), (site,))
    adapter = so8t_adapter(64, 2, sites=sites, triality=triality, final=False, strength=2.0)
    from so8t_deploy.bake.bake import bake_model

    bake_model(model, [(None, adapter)], tmp_path / "baked", Scales())
    report = verify_bake(model, [(None, adapter)], tmp_path / "baked", Scales())
    assert report.max_abs_diff <= TOLERANCE and report.adapter_effect > 1e-3, report


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_a_lora_bias_that_needs_attention_bias_is_refused(family_base, run_cli, tmp_path, name):
    """Qwen3's and Gemma's attention_bias gives o_proj a bias too, which llama.cpp's graphs cannot load (measured:
    "done_getting_tensors: wrong number of tensors; expected 33, got 31" on a baked Qwen3): refused up front."""
    model = family_base(name)
    adapter = save_peft_adapter(model, tmp_path / "adapter", target_modules=["q_proj"], lora_bias=True)
    line = _refused(run_cli, _manifest(tmp_path / "m.yaml", model, [adapter]))
    assert "gets a LoRA bias" in line and "attention_bias would give o_proj a bias" in line


# --- Gemma 3's scaled embedding: PEFT's forward, PEFT's merge and our fold ---------------------------------------

@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gemma3_embedding_lora_matches_peft(family_base, run_cli, tmp_path, dora):
    """Gemma3TextScaledWordEmbedding scales inside its forward; PEFT scales the LoRA rows the same way, so
    E <- E + s (BA)^T is exact. The embedding ends differ from the (tied) head afterwards: the bake unties it,
    which is PEFT's forward, and PEFT's merge once the head is untied first (merged into the still-shared
    matrix, PEFT's merge_and_unload moves the head too, by ~45 logits here: it disagrees with PEFT's forward)."""
    model = family_base("gemma3")
    adapter = save_peft_adapter(model, tmp_path / "adapter", target_modules=["embed_tokens", "q_proj", "down_proj"],
                                use_dora=dora)
    out = _bake(run_cli, model, [adapter], tmp_path / "baked")
    assert "lm_head.weight" in open_model_dir(out).tensor_names
    report = verify_bake(model, [(None, adapter)], out, Scales())
    assert report.max_abs_diff <= TOLERANCE and report.adapter_effect > 0.05, report
    tokens = probe(320)
    merged = peft_merged_logits(model, adapter, None, tokens, untie_first=True)
    assert (merged - _hf_logits(out, tokens)).abs().max() <= TOLERANCE


def test_gemma3_chain_reads_the_scaled_embedding_back(family_base, so8t_adapter, run_cli, tmp_path):
    """Embedding LoRA, SO8T, embedding LoRA: between two the reference replaces PEFT's embedding by a plain
    Gemma3TextScaledWordEmbedding whose scaled rows are what PEFT's returned (not by an unscaled nn.Embedding)."""
    model = family_base("gemma3")
    lora = save_peft_adapter(model, tmp_path / "lora", target_modules=["embed_tokens", "v_proj"])
    second = save_peft_adapter(model, tmp_path / "second", seed=1, target_modules=["embed_tokens", "q_proj"])
    chain = [lora, so8t_adapter(64, 6), second]
    out = _bake(run_cli, model, chain, tmp_path / "baked")
    report = verify_bake(model, [(None, a) for a in chain], out, Scales())
    assert report.max_abs_diff <= TOLERANCE and report.adapter_effect > 0.05, report


# --- refusals ---------------------------------------------------------------------------------------------------

def _manifest(path: Path, model: Path, adapters: list[Path]) -> Path:
    from so8t_deploy.demo import DEMO_MANIFEST

    kinds = ["so8t" if (a / "so8t_config.json").is_file() else "lora" for a in adapters]
    entries = "".join(f"\n    - {{kind: {k}, path: {a}}}" for k, a in zip(kinds, adapters, strict=True)) or " []"
    path.write_text(DEMO_MANIFEST.replace("./model", str(model))
                    .replace("\n    - {kind: so8t, path: ./adapters/so8t}", entries)
                    .replace("  template: auto\n", "  template: phi3\n  unchecked_template: phi3\n"))  # not the chat
    return path


def _refused(run_cli, manifest: Path) -> str:
    result = run_cli("validate", manifest)
    assert result.code == 2, (result.out, result.err)
    [line] = result.err.strip().splitlines()
    return line


def test_gemma2_refuses_the_final_site(family_base, so8t_adapter, run_cli, tmp_path):
    adapter = so8t_adapter(64, 2, final=True)
    line = _refused(run_cli, _manifest(tmp_path / "m.yaml", family_base("gemma2"), [adapter]))
    assert f"{adapter / 'so8t_adapter.safetensors'}: final:" in line
    assert "llama.cpp's gemma2 always uses the token embeddings" in line and "remove final.*" in line
    result = run_cli("bake", "--model", family_base("gemma2"), "--adapter", adapter, "--out", tmp_path / "o")
    assert result.code == 2 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(("config", "cause"), [
    ({"target_modules": ["q_proj", "lm_head"]}, "LoRA on 'lm_head'"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "saved tensor 'base_model.model.lm_head"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "embedding LoRA on 'model.embed_tokens'"),
])
def test_gemma2_refuses_a_lora_that_unties_the_head(family_base, run_cli, tmp_path, config, cause):
    model = family_base("gemma2")
    adapter = save_peft_adapter(model, tmp_path / "adapter", **config)
    line = _refused(run_cli, _manifest(tmp_path / "m.yaml", model, [adapter]))
    assert line.startswith(f"{tmp_path / 'm.yaml'}: {adapter / 'adapter_model.safetensors'}: ")
    assert cause in line and "makes lm_head differ from the token embeddings" in line


def test_gemma2_without_final_validates_and_names_the_family(family_adapters, run_cli, tmp_path):
    model, lora, so8t = family_adapters("gemma2")
    result = run_cli("validate", _manifest(tmp_path / "m.yaml", model, [lora, so8t]))
    assert result.code == 0, result.err
    assert "model: Gemma 2 (gemma2)" in result.out


@pytest.mark.parametrize(("name", "family"), [("qwen3", "Qwen3 (qwen3)"), ("gemma3", "Gemma 3 (gemma3_text)"),
                                              ("phi4", "Phi-3 / Phi-4 (phi3)")])
def test_validate_names_the_family(family_base, run_cli, tmp_path, name, family):
    result = run_cli("validate", _manifest(tmp_path / "m.yaml", family_base(name), []))
    assert result.code == 0, result.err
    assert f"model: {family}" in result.out


def test_gemma3_multimodal_checkpoint_is_refused_by_name(family_base, run_cli, tmp_path):
    model = shutil.copytree(family_base("gemma3"), tmp_path / "gemma3-mm")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"])
    (model / "config.json").write_text(json.dumps(config))
    line = _refused(run_cli, _manifest(tmp_path / "m.yaml", model, []))
    assert "model_type 'gemma3'" in line and "Gemma3ForConditionalGeneration" in line and "gemma3_text" in line


def test_unsupported_model_type_lists_the_supported_ones(family_base, run_cli, tmp_path):
    model = shutil.copytree(family_base("qwen3"), tmp_path / "other")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "olmo2"}))
    line = _refused(run_cli, _manifest(tmp_path / "m.yaml", model, []))
    assert ("unsupported architecture 'olmo2' (supported: phi3, llama, mistral, qwen2, qwen3, gemma2, gemma3_text)"
            in line)


# --- llama.cpp --------------------------------------------------------------------------------------------------

GGUF_TOKENS = [1, 17, 42, 99, 150, 201, 250, 299, 300, 303, 5, 64]
GGUF_ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi4": "phi3", "phi4-mini": "phi3"}


class GgmlGelu(torch.nn.Module):
    """GELU (tanh) as ggml's CPU backend computes it for f32 tensors (ggml-cpu/vec.h, GGML_GELU_FP16): the input
    rounded to fp16, looked up in an fp16 table; 0 below -10, x above 10.

    That rounding alone moves a tiny Gemma's logits by ~1.1-1.5e-3 against transformers' fp32 GELU (the base model
    too, before any adapter), so Gemma's f32 GGUF is compared with the model running this GELU; every other
    family's activation (SiLU) ggml computes in f32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rounded = x.to(torch.float16).to(x.dtype)
        table = torch.nn.functional.gelu(rounded, approximate="tanh").to(torch.float16).to(x.dtype)
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


@torch.no_grad()
def _llama_cpp_arithmetic_logits(model_dir: Path, tokens: list[int]):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    if getattr(model.config, "hidden_activation", None) == "gelu_pytorch_tanh":
        for layer in model.model.layers:
            layer.mlp.act_fn = GgmlGelu()
    return model(torch.tensor([tokens])).logits[0].double().numpy()


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_f32_gguf_of_the_baked_family_matches(family_adapters, run_cli, tmp_path, name):
    """Both adapters baked (Gemma 3 with `final`: an untied head llama.cpp must load), converted to f32."""
    from so8t_deploy.external.gguf_info import read_gguf_info
    from so8t_deploy.external.llamacpp import gguf_logits

    model, lora, so8t = family_adapters(name)
    out = _bake(run_cli, model, [lora, so8t], tmp_path / name)  # the directory name becomes the GGUF's name
    gguf = tmp_path / "model.f32.gguf"
    result = run_cli("convert", out, "--out", gguf, "--outtype", "f32")
    assert result.code == 0, result.err
    assert read_gguf_info(gguf).architecture == GGUF_ARCH[name]
    expected = _llama_cpp_arithmetic_logits(out, GGUF_TOKENS)
    got = gguf_logits(gguf, GGUF_TOKENS)
    assert abs(got - expected).max() < 1e-3
    base = _llama_cpp_arithmetic_logits(model, GGUF_TOKENS)
    assert abs(expected - base).max() > 0.1  # the adapters are visible in the GGUF's logits
