"""Tiny models of real chat families (tiny_models.write_family_model): each has the family's own tokenizer and
chat template from the pinned llama.cpp sdist, loads in transformers, goes through the product's converter with
its template and EOS intact, and runs in llama.cpp with the same tokens and logits as in transformers."""

from __future__ import annotations

import json
import os
import re
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from so8t_deploy.errors import BuildError, UsageError
from so8t_deploy.tiny_models import FAMILIES, FAMILY_SPECS, write_family_model

from .conftest import once_per_run, require

CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
LLAMA3_EOS = (128001, 128008, 128009)  # <|end_of_text|> <|eom_id|> <|eot_id|>


@dataclass(frozen=True)
class Expected:
    eos: str
    eos_id: int
    bos_id: int | None  # the tokenizer's (Qwen2.5 has no bos token)
    generation_eos: tuple[int, ...]
    vocab_size: int
    pieces: tuple[str, ...]  # in the rendered system+user prompt, in order
    prompt_end: str  # the generation prompt
    special: str  # a special token that llama.cpp must read as one token
    pre: str  # the GGUF's tokenizer.ggml.pre
    tied: bool = False
    system: bool = True  # the template takes a system message (Gemma 2's refuses one)
    # llama.cpp against transformers: ggml's CPU GELU rounds its input to fp16 and reads an fp16 table
    # (GGML_GELU_FP16; see test_families.GgmlGelu), which moves a tiny Gemma's logits by ~1-1.5e-3
    logits_atol: float = 1e-4


def _llama3(tied: bool) -> Expected:
    return Expected(
        eos="<|eot_id|>", eos_id=128009, bos_id=128000, generation_eos=LLAMA3_EOS, vocab_size=128256,
        pieces=("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n", "You are terse.<|eot_id|>",
                "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"),
        prompt_end="<|start_header_id|>assistant<|end_header_id|>\n\n", special="<|eot_id|>", pre="llama-bpe",
        tied=tied)


EXPECTED = {
    "llama3.1": _llama3(tied=False),
    "llama3.2": _llama3(tied=True),
    "llama3.3": _llama3(tied=False),
    "qwen2.5": Expected(
        eos="<|im_end|>", eos_id=151645, bos_id=None, generation_eos=(151645, 151643), vocab_size=152064,
        pieces=("<|im_start|>system\nYou are terse.<|im_end|>\n", "<|im_start|>user\nHi there<|im_end|>\n"),
        prompt_end="<|im_start|>assistant\n", special="<|im_end|>", pre="qwen2"),
    "mistral-nemo": Expected(
        eos="</s>", eos_id=2, bos_id=1, generation_eos=(2,), vocab_size=32007,
        pieces=("<s>[INST]You are terse.\n\nHi there[/INST]",), prompt_end="[/INST]", special="[INST]",
        pre="default"),
    "phi3.5": Expected(
        eos="<|endoftext|>", eos_id=32000, bos_id=1, generation_eos=(32007, 32001, 32000), vocab_size=32064,
        pieces=("<|system|>\nYou are terse.<|end|>\n", "<|user|>\nHi there<|end|>\n"), prompt_end="<|assistant|>\n",
        special="<|end|>", pre="default"),
    "qwen3": Expected(
        eos="<|im_end|>", eos_id=151645, bos_id=None, generation_eos=(151645, 151643), vocab_size=151936,
        pieces=("<|im_start|>system\nYou are terse.<|im_end|>\n", "<|im_start|>user\nHi there<|im_end|>\n"),
        prompt_end="<|im_start|>assistant\n", special="<|im_end|>", pre="qwen2", tied=True),
    "gemma2": Expected(
        eos="<eos>", eos_id=2, bos_id=1, generation_eos=(2, 32003), vocab_size=32004,
        pieces=("<bos><start_of_turn>user\nHi there<end_of_turn>\n",), prompt_end="<start_of_turn>model\n",
        special="<start_of_turn>", pre="default", tied=True, system=False, logits_atol=3e-3),
    "gemma3": Expected(
        eos="<eos>", eos_id=2, bos_id=1, generation_eos=(2, 32003), vocab_size=32004,
        pieces=("<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n",),
        prompt_end="<start_of_turn>model\n", special="<end_of_turn>", pre="default", tied=True, logits_atol=3e-3),
    "phi4": Expected(
        eos="<|im_end|>", eos_id=50258, bos_id=50256, generation_eos=(50258,), vocab_size=50304,
        pieces=("<|im_start|>system<|im_sep|>You are terse.<|im_end|>", "<|im_start|>user<|im_sep|>Hi there<|im_end|>"),
        prompt_end="<|im_start|>assistant<|im_sep|>", special="<|im_sep|>", pre="gpt-2"),
}
slow_family = pytest.mark.parametrize("family", FAMILIES)


def conversation_for(family: str) -> list[dict]:
    return CONVERSATION if EXPECTED[family].system else CONVERSATION[1:]


def source_template(family: str) -> str:
    """The family's chat template where it comes from: llama.cpp's models/templates/, its test cases, or tests/."""
    from so8t_deploy.external.llamacpp import locate_llama_cpp_models
    from so8t_deploy.tiny_models import chat_template_case

    from .family_templates import family_chat_template

    spec = FAMILY_SPECS[family]
    if spec.template:
        name = f"templates/{spec.template}"
        return locate_llama_cpp_models([name])[name].read_text(encoding="utf-8")
    if spec.template_case:
        return chat_template_case(spec.template_case)
    template = family_chat_template(family)
    assert template is not None
    return template


@pytest.fixture(scope="session")
def family_gguf(request, family_model, tmp_path_factory):
    """The family model converted to an f32 GGUF by the product's converter, once per run (conftest.once_per_run:
    under xdist, by whichever worker comes first).

    The first call converts every family this session's tests ask for, each in a child process while the
    next family's model is built here, so that building and converting overlap.
    """
    from so8t_deploy.external.llamacpp import convert_to_gguf, locate_converter

    wanted = [f for f in FAMILIES if any(
        "family_gguf" in getattr(item, "fixturenames", ()) and getattr(item, "callspec", None) is not None
        and item.callspec.params.get("family") == f for item in request.session.items)]
    futures: dict[str, Future[Path]] = {}

    def convert_one(family: str, model_dir: Path) -> Path:
        name = f"{family}.f32.gguf"
        root = once_per_run(tmp_path_factory, f"family-gguf-{family}",
                            lambda root: convert_to_gguf(converter, model_dir, root / name, "f32"))
        return root / name

    def start(family: str, pool: ThreadPoolExecutor) -> None:
        if family not in futures:
            model_dir = family_model(family)
            futures[family] = pool.submit(convert_one, family, model_dir)

    with ThreadPoolExecutor(max_workers=2) as pool:
        converter = locate_converter()

        def convert(family: str) -> Path:
            for f in [*wanted, family]:
                start(f, pool)
            return futures[family].result()

        yield convert


def _gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF's metadata as llama.cpp reads it (gguf's GGUFReader takes seconds over 280k merges), and its
    token count as "n_tokens"."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return {**llm.metadata, "n_tokens": str(llm.n_vocab())}
    finally:
        llm.close()


def test_families_are_the_documented_ones():
    # mistral-v0.3 is left out: the pinned sdist has no Mistral-7B-Instruct-v0.3 chat template.
    assert FAMILIES == ("llama3.1", "llama3.2", "llama3.3", "qwen2.5", "mistral-nemo", "phi3.5", "qwen3", "gemma2",
                        "gemma3", "phi4")
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.slow
@pytest.mark.llamacpp
@slow_family
def test_the_converter_keeps_the_template_and_eos(family, family_gguf, family_tokenizer):
    expected, tokenizer = EXPECTED[family], family_tokenizer(family)
    metadata = _gguf_metadata(family_gguf(family))
    assert metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert int(metadata["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id == expected.eos_id
    if expected.bos_id is not None:
        assert int(metadata["tokenizer.ggml.bos_token_id"]) == expected.bos_id
    assert metadata["tokenizer.ggml.pre"] == expected.pre
    assert metadata["tokenizer.ggml.model"] == ("gpt2" if expected.pre != "default" else "llama")
    assert int(metadata["n_tokens"]) == expected.vocab_size
    arch = FAMILY_SPECS[family].arch
    assert metadata["general.architecture"] == ("llama" if arch == "mistral" else arch)


@pytest.mark.slow
@slow_family
def test_transformers_loads_the_family_model(family, family_model, family_tokenizer):
    import torch
    import transformers

    expected, spec, model_dir = EXPECTED[family], FAMILY_SPECS[family], family_model(family)
    tokenizer = family_tokenizer(family)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == expected.vocab_size >= len(tokenizer)
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                        "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
                                        "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                                        "gemma3": "Gemma3ForCausalLM"}[spec.arch]]
    assert config["tie_word_embeddings"] is expected.tied
    assert config["eos_token_id"] == expected.eos_id
    generation = json.loads((model_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tuple(eos if isinstance(eos, list) else [eos]) == expected.generation_eos

    # The tokenizer: the family's tokens, bos/eos, and its chat template verbatim from its source.
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id) == (
        expected.eos, expected.eos_id, expected.bos_id)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == tokenizer.chat_template == source_template(family)
    assert not (model_dir / "chat_template.jinja").exists()
    rendered = tokenizer.apply_chat_template(conversation_for(family), tokenize=False, add_generation_prompt=True)
    at = 0
    for piece in expected.pieces:
        found = rendered.find(piece, at)
        assert found >= 0, f"{piece!r} not in order in {rendered!r}"
        at = found + len(piece)
    assert rendered.endswith(expected.prompt_end)
    assert tokenizer.encode(expected.special, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(
        expected.special)]
    if family == "qwen3":  # Qwen3's tokens after Qwen2.5's, at Qwen3's ids
        assert tokenizer.convert_tokens_to_ids(["<tool_response>", "</tool_response>", "<think>", "</think>"]) == [
            151665, 151666, 151667, 151668]
    ids = tokenizer.encode(rendered, add_special_tokens=False)

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), expected.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.llamacpp
@slow_family
def test_llama_cpp_reads_the_same_tokens_and_computes_the_same_logits(family, family_model, family_gguf,
                                                                      family_tokenizer):
    import llama_cpp
    import torch
    import transformers

    from so8t_deploy.external.llamacpp import gguf_logits

    expected, tokenizer, path = EXPECTED[family], family_tokenizer(family), family_gguf(family)
    rendered = tokenizer.apply_chat_template(conversation_for(family), tokenize=False, add_generation_prompt=True)
    hf_ids = tokenizer.encode(rendered, add_special_tokens=False)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        special_id = tokenizer.convert_tokens_to_ids(expected.special)
        assert llm.tokenize(expected.special.encode(), add_bos=False, special=True) == [special_id]
        assert len(llm.tokenize(expected.special.encode(), add_bos=False, special=False)) > 1  # as text: pieces
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == hf_ids
        assert (llm.token_eos(), llm.n_vocab()) == (expected.eos_id, expected.vocab_size)
    finally:
        llm.close()

    model = transformers.AutoModelForCausalLM.from_pretrained(family_model(family), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([hf_ids])).logits[0].double().numpy()
    np.testing.assert_allclose(gguf_logits(path, hf_ids), reference, atol=expected.logits_atol, rtol=0)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_an_eos_other_than_the_family_default(tmp_path):
    import transformers

    from so8t_deploy.external.llamacpp import convert_to_gguf, locate_converter

    model_dir = write_family_model(tmp_path / "phi3.5", "phi3.5", eos_override="<|end|>", generation_eos=["<|end|>"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|end|>", 32007)
    assert json.loads((model_dir / "config.json").read_text())["eos_token_id"] == 32007
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 32007
    out = tmp_path / "phi3.5.gguf"
    convert_to_gguf(locate_converter(), model_dir, out, "f16")
    assert _gguf_metadata(out)["tokenizer.ggml.eos_token_id"] == "32007"

    with pytest.raises(ValueError, match="unknown chat family"):
        write_family_model(tmp_path / "nope", "mistral-v0.3")
    with pytest.raises(ValueError, match=re.escape("'<|nope|>' is not one of")):
        write_family_model(tmp_path / "bad-eos", "phi3.5", eos_override="<|nope|>")
    with pytest.raises(ValueError, match=re.escape("'<|nope|>' is not one of")):
        write_family_model(tmp_path / "bad-generation-eos", "phi3.5", generation_eos=["<|end|>", "<|nope|>"])


def test_llama_cpp_models_are_extracted_once_atomically(tmp_path, monkeypatch):
    from so8t_deploy.external import llamacpp

    sdist = os.environ.get("SO8T_LLAMA_CPP_SDIST")
    require("the llama-cpp-python sdist", bool(sdist) and Path(sdist).is_file(), "run `make test`")
    monkeypatch.delenv("SO8T_LLAMA_CPP_DIR", raising=False)
    names = ["templates/microsoft-Phi-3.5-mini-instruct.jinja", "ggml-vocab-phi-3.gguf"]
    found = llamacpp.locate_llama_cpp_models(names, converter_dir=tmp_path)
    root = tmp_path / f"llama.cpp-{llamacpp.LLAMA_CPP_PYTHON_VERSION}-models"
    assert found == {name: root / name for name in names}
    with tarfile.open(sdist) as archive:
        member = archive.extractfile(f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
                                     f"models/{names[0]}")
        assert member is not None and member.read() == found[names[0]].read_bytes()
    # Nothing else is left beside them: no staging files, no temporary directory, only the lock.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{root.name}.lock", root.name]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == sorted([*names, "templates"])

    def no_sdist(*args, **kwargs):
        raise AssertionError("the sdist was opened again")

    with monkeypatch.context() as patch:
        patch.setattr(llamacpp.tarfile, "open", no_sdist)
        assert llamacpp.locate_llama_cpp_models(names[:1], converter_dir=tmp_path) == {names[0]: found[names[0]]}
    with pytest.raises(BuildError, match="no vendor/llama.cpp/models/templates/none.jinja inside"):
        llamacpp.locate_llama_cpp_models(["templates/none.jinja"], converter_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{root.name}.lock", root.name]
    for bad in ("../convert_hf_to_gguf.py", "/etc/passwd", "templates/../../x"):
        with pytest.raises(UsageError, match="not a path inside"):
            llamacpp.locate_llama_cpp_models([bad], converter_dir=tmp_path)

    # A llama.cpp checkout named by SO8T_LLAMA_CPP_DIR is used as it is.
    checkout = tmp_path / "llama.cpp"
    (checkout / "models" / "templates").mkdir(parents=True)
    (checkout / "models" / names[0]).write_text("{{ messages }}")
    monkeypatch.setenv("SO8T_LLAMA_CPP_DIR", str(checkout))
    assert llamacpp.locate_llama_cpp_models(names[:1]) == {names[0]: checkout / "models" / names[0]}
    with pytest.raises(UsageError, match="no models/ggml-vocab-phi-3.gguf there"):
        llamacpp.locate_llama_cpp_models(names)


def test_llama_cpp_test_files_are_extracted_beside_the_models(tmp_path, monkeypatch):
    from so8t_deploy.external import llamacpp

    sdist = os.environ.get("SO8T_LLAMA_CPP_SDIST")
    require("the llama-cpp-python sdist", bool(sdist) and Path(sdist).is_file(), "run `make test`")
    monkeypatch.delenv("SO8T_LLAMA_CPP_DIR", raising=False)
    file = "test-chat-template.cpp"
    found = llamacpp.locate_llama_cpp_models([file], converter_dir=tmp_path, directory="tests")
    root = tmp_path / f"llama.cpp-{llamacpp.LLAMA_CPP_PYTHON_VERSION}-tests"
    assert found == {file: root / file} and '"phi-4"' in found[file].read_text(encoding="utf-8")
    with pytest.raises(UsageError, match="'examples': not one of llama.cpp's models, tests directories"):
        llamacpp.locate_llama_cpp_models([file], converter_dir=tmp_path, directory="examples")
