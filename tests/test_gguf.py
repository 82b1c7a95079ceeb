"""GGUF conversion and quantization with the pinned llama.cpp, checked by llama.cpp's own logits."""

from __future__ import annotations

import json
import shutil
import tomllib

import numpy as np
import pytest
import torch

from so8t_deploy.bake.bake import bake_model
from so8t_deploy.bake.layout import layout_from_config
from so8t_deploy.bake.model_dir import open_model_dir
from so8t_deploy.bake.verify import attach_adapters, load_adapters
from so8t_deploy.external.gguf_info import read_gguf_info
from so8t_deploy.external.imatrix import write_legacy_imatrix
from so8t_deploy.external.llamacpp import LLAMA_CPP_PYTHON_VERSION, gguf_logits
from so8t_deploy.manifest.schema import Scales

from .conftest import REPO

pytestmark = pytest.mark.llamacpp

TOKENS = [1, 17, 42, 99, 150, 201, 250, 299, 300, 303, 5, 64]


def reference_logits(model_dir, adapter_dirs, scales: Scales | None = None) -> np.ndarray:
    """The adapter model evaluated by hooks (no folding), in float32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layout = layout_from_config(json.loads((model_dir / "config.json").read_text()), "config.json")
    adapters = load_adapters([(None, a) for a in adapter_dirs], open_model_dir(model_dir))
    attach_adapters(model, adapters, layout, scales or Scales())
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double().numpy()


@pytest.fixture(scope="module")
def baked_models(tiny_model, so8t_adapter, tmp_path_factory):
    """Tiny Phi-3 (GQA) and tied Llama, each with a full SO8T adapter, baked."""
    out = {}
    for arch, kwargs in (("phi3", {"num_kv_heads": 2}), ("llama", {"tie_word_embeddings": True})):
        model, adapter = tiny_model(arch, **kwargs), so8t_adapter(64, 2)
        baked = tmp_path_factory.mktemp("baked") / arch
        bake_model(model, [(None, adapter)], baked, Scales())
        out[arch] = (model, adapter, baked)
    return out


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_f32_gguf_reproduces_the_adapter_model(baked_models, run_cli, tmp_path, arch):
    model, adapter, baked = baked_models[arch]
    gguf = tmp_path / "model.f32.gguf"
    result = run_cli("convert", baked, "--out", gguf, "--outtype", "f32")
    assert result.code == 0, result.err
    info = read_gguf_info(gguf)
    assert info.architecture == arch  # a merged Phi-3 must not convert as llama
    reference = reference_logits(model, [adapter])
    got = gguf_logits(gguf, TOKENS)
    assert np.abs(got - reference).max() < 1e-3
    base = reference_logits(model, [], Scales())
    assert np.abs(reference - base).max() > 0.1  # the adapter is visible in the GGUF's logits


def test_f16_gguf_within_its_documented_tolerance(baked_models, run_cli, tmp_path):
    model, adapter, baked = baked_models["phi3"]
    gguf = tmp_path / "model.f16.gguf"
    assert run_cli("convert", baked, "--out", gguf, "--outtype", "f16").code == 0
    reference = reference_logits(model, [adapter])
    # f16 weights keep ~11 bits: allow 1% of the logit scale (README: Tolerances)
    assert np.abs(gguf_logits(gguf, TOKENS) - reference).max() < 1e-2 * np.abs(reference).max()


def test_gguf_carries_provenance(baked_models, run_cli, tmp_path):
    _, adapter, baked = baked_models["phi3"]
    gguf = tmp_path / "model.gguf"
    assert run_cli("convert", baked, "--out", gguf).code == 0
    metadata = read_gguf_info(gguf).metadata
    provenance = json.loads((baked / "so8t_bake.json").read_text())
    assert metadata["so8t.source_model"] == provenance["source"]
    assert json.loads(metadata["so8t.adapters"])[0]["digest"] == provenance["adapters"][0]["digest"]
    assert json.loads(metadata["so8t.scales"]) == {"rotation": 1.0, "ffn": 1.0, "triality": 1.0}
    assert metadata["so8t.tool_version"]


@pytest.fixture(scope="module")
def f16_256(tiny_model, tmp_path_factory):
    """An f16 GGUF of a hidden-256 Phi-3, so K-quants apply to every tensor."""
    from so8t_deploy.external.llamacpp import convert_to_gguf, locate_converter

    out = tmp_path_factory.mktemp("gguf256") / "model-f16.gguf"
    convert_to_gguf(locate_converter(), tiny_model("phi3", hidden_size=256), out, "f16")
    return out


@pytest.mark.parametrize(("quant", "file_type"), [("q8_0", 7), ("Q6_K", 18), ("q5_k_m", 17), ("q4_k_m", 15)])
def test_quantized_files_load_and_generate(f16_256, run_cli, tmp_path, quant, file_type):
    import llama_cpp

    out = tmp_path / f"model-{quant}.gguf"
    result = run_cli("quantize", f16_256, "--out", out, "--type", quant)
    assert result.code == 0, result.err
    info = read_gguf_info(out)
    assert info.file_type == file_type
    assert info.bits_per_weight < read_gguf_info(f16_256).bits_per_weight
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    completion = llm.create_completion("hello world", max_tokens=8, temperature=0.0)
    llm.close()
    assert completion["usage"]["completion_tokens"] > 0


def test_imatrix_types_need_an_imatrix(f16_256, run_cli, tmp_path):
    out = tmp_path / "iq2.gguf"
    result = run_cli("quantize", f16_256, "--out", out, "--type", "IQ2_XS")
    assert result.code == 2 and "--imatrix" in result.err and not out.exists()
    from gguf import GGUFReader

    entries = {t.name: [1.0] * int(t.shape[0]) for t in GGUFReader(f16_256).tensors if len(t.shape) == 2}
    imatrix = tmp_path / "imatrix.dat"
    write_legacy_imatrix(imatrix, entries, ncall=4)
    result = run_cli("quantize", f16_256, "--out", out, "--type", "iq2_xs", "--imatrix", imatrix)
    assert result.code == 0, result.err
    assert read_gguf_info(out).file_type == 20
    keys = {name: f.contents() for name, f in GGUFReader(out).fields.items() if name.startswith("quantize.")}
    assert keys == {"quantize.imatrix.file": str(imatrix), "quantize.imatrix.entries_count": len(entries),
                    "quantize.imatrix.chunks_count": 4}  # as llama-quantize --imatrix records a legacy file


def test_the_imatrix_command_computes_what_quantize_takes(f16_256, run_cli, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("the spinor of a rotation is the token of the vector and the prompt\n" * 80)
    matrix = tmp_path / "m.imatrix.gguf"
    result = run_cli("imatrix", f16_256, "--text", text, "--out", matrix, "--ctx", "64", "--chunks", "2")
    assert result.code == 0, result.err
    assert "chunk 2/2" in result.err and result.out.startswith(f"{matrix}: ") and "from 2 chunks of 64" in result.out
    out = tmp_path / "q.gguf"
    assert run_cli("quantize", f16_256, "--out", out, "--type", "iq3_xxs", "--imatrix", matrix).code == 0
    from gguf import GGUFReader

    assert GGUFReader(out).fields["quantize.imatrix.dataset"].contents() == "calibration.txt"
    short = tmp_path / "short.txt"
    short.write_text("too short")
    result = run_cli("imatrix", f16_256, "--text", short, "--out", tmp_path / "x.gguf", "--ctx", "64")
    assert result.code == 2 and "needs at least 128" in result.err and not (tmp_path / "x.gguf").exists()


def test_requantizing_is_refused_unless_asked(f16_256, run_cli, tmp_path):
    q8 = tmp_path / "q8.gguf"
    assert run_cli("quantize", f16_256, "--out", q8, "--type", "q8_0").code == 0
    result = run_cli("quantize", q8, "--out", tmp_path / "q4.gguf", "--type", "q4_k_m")
    assert result.code == 2 and "already quantized" in result.err and not (tmp_path / "q4.gguf").exists()
    result = run_cli("quantize", q8, "--out", tmp_path / "q4.gguf", "--type", "q4_k_m", "--allow-requantize")
    assert result.code == 0 and read_gguf_info(tmp_path / "q4.gguf").file_type == 15


def test_unknown_quant_type_is_exit_2(f16_256, run_cli, tmp_path):
    result = run_cli("quantize", f16_256, "--out", tmp_path / "x.gguf", "--type", "q3_k_xl")
    assert result.code == 2 and "unknown quant type 'q3_k_xl'" in result.err


def test_unsupported_architecture_is_a_clear_error(tiny_model, run_cli, tmp_path):
    model = shutil.copytree(tiny_model("phi3"), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NoSuchForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    result = run_cli("convert", model, "--out", tmp_path / "x.gguf")
    assert result.code == 2 and "does not support this architecture" in result.err
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".x.gguf*")) == []


def test_failed_conversion_leaves_no_partial_gguf(tiny_model, run_cli, tmp_path):
    model = shutil.copytree(tiny_model("phi3"), tmp_path / "model")
    (model / "tokenizer.model").unlink()
    result = run_cli("convert", model, "--out", tmp_path / "out" / "x.gguf")
    assert result.code == 1 and "conversion failed" in result.err
    assert list((tmp_path / "out").iterdir()) == []


def test_llama_cpp_is_pinned_in_one_version():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bake"]
    assert f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}" in extras
    assert f"LLAMA_CPP_PYTHON_VERSION = \"{LLAMA_CPP_PYTHON_VERSION}\"" in (
        REPO / "so8t_deploy" / "external" / "llamacpp.py").read_text()


def test_llama_cpps_own_log_shows_only_with_verbose(f16_256, run_cli, tmp_path):
    quiet = run_cli("quantize", f16_256, "--out", tmp_path / "a.gguf", "--type", "q8_0")
    assert quiet.code == 0 and "llama_model_quantize" not in quiet.err and "[ " not in quiet.err
    loud = run_cli("-v", "quantize", f16_256, "--out", tmp_path / "b.gguf", "--type", "q8_0")
    assert loud.code == 0 and "so8t_deploy.llama_cpp: llama_model_quantize" in loud.err
