"""Importance matrices through llama-cpp-python's eval callback: llama-imatrix's statistics and file format."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from so8t_deploy.errors import UsageError
from so8t_deploy.external.imatrix import ImatrixInfo, load_imatrix, read_imatrix_info, write_legacy_imatrix
from so8t_deploy.external.imatrix_compute import compute_imatrix
from so8t_deploy.external.imatrix_runner import CollectError, Collector
from so8t_deploy.external.llamacpp import convert_to_gguf, locate_converter, quantize_gguf
from so8t_deploy.manifest.quant_types import lookup_quant_type
from so8t_deploy.tiny_models import _WORDS

pytestmark = pytest.mark.llamacpp

CTX = 64
CHUNKS = 3  # fewer than the text holds, so the limit is exercised


def _text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words)) + "\n"


@pytest.fixture(scope="module")
def f32_gguf(tiny_model, tmp_path_factory) -> Path:
    """Tiny Phi-3 (rows of 256, as k-quants need) whose vocabulary adds a BOS, so each chunk's first token is
    replaced by it (the session's model directory is copied, not changed)."""
    root = tmp_path_factory.mktemp("imatrix-model")
    model_dir = shutil.copytree(tiny_model("phi3", hidden_size=256), root / "phi3-bos")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config))
    out = root / "phi3-f32.gguf"
    convert_to_gguf(locate_converter(), model_dir, out, "f32")
    return out


@pytest.fixture(scope="module")
def computed(f32_gguf, tmp_path_factory) -> tuple[Path, Path, ImatrixInfo, list[tuple[int, int]]]:
    """(imatrix, text, returned info, progress calls) of one computation."""
    root = tmp_path_factory.mktemp("imatrix")
    text = root / "calibration.txt"
    text.write_text(_text(400))
    progress: list[tuple[int, int]] = []
    out = root / "phi3.imatrix.gguf"
    info = compute_imatrix(f32_gguf, text, out, dataset="calibration.txt", ctx=CTX, chunks=CHUNKS, threads=2,
                           on_progress=lambda done, total: progress.append((done, total)))
    return out, text, info, progress


def _tokens(gguf_path: Path, text: str) -> tuple[list[int], int, bool]:
    """The text's tokens as llama.cpp's compute_imatrix makes them (add_special, one final newline dropped),
    the BOS token, and whether the vocabulary adds it."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        tokens = llm.tokenize(text.removesuffix("\n").encode(), add_bos=True, special=False)
        return tokens, llm.token_bos(), llm._model.add_bos_token()
    finally:
        llm.close()


def test_first_matmul_sums_match_numpy(f32_gguf, computed):
    """blk.0.attn_qkv sees rms_norm(token_embd[token]) * attn_norm for every token of every chunk."""
    from gguf import GGUFReader

    imatrix, text, _, _ = computed
    model = GGUFReader(f32_gguf)
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in model.tensors}
    eps = float(model.fields["phi3.attention.layer_norm_rms_epsilon"].contents())
    tokens, bos, adds_bos = _tokens(f32_gguf, text.read_text())
    assert adds_bos and len(tokens) // CTX > CHUNKS
    expected = np.zeros(tensors["token_embd.weight"].shape[1])
    for i in range(CHUNKS):
        chunk = tokens[i * CTX:(i + 1) * CTX]
        chunk[0] = bos
        x = tensors["token_embd.weight"][chunk]
        x = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) * tensors["blk.0.attn_norm.weight"]
        expected += (x * x).sum(axis=0)
    found = {t.name: t.data.reshape(-1) for t in GGUFReader(imatrix).tensors}
    np.testing.assert_allclose(found["blk.0.attn_qkv.weight.in_sum2"], expected, rtol=1e-4)
    assert found["blk.0.attn_qkv.weight.counts"].tolist() == [CHUNKS * CTX]


def test_file_reads_back_with_the_model_matmul_weights(f32_gguf, computed):
    from gguf import GGUFReader

    imatrix, _, info, _ = computed
    weights = {t.name for t in GGUFReader(f32_gguf).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    assert weights and set(load_imatrix(imatrix)) == weights
    assert info == read_imatrix_info(imatrix) == ImatrixInfo(len(weights), CHUNKS, CTX, ("calibration.txt",))
    reader = GGUFReader(imatrix)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields  # save_imatrix writes none
    # save_imatrix's order: entries by name, each its in_sum2 then its counts
    assert [t.name for t in reader.tensors] == [f"{w}{suffix}" for w in sorted(weights)
                                                for suffix in (".in_sum2", ".counts")]
    assert all(int(t.data.reshape(-1)[0]) == CHUNKS * CTX for t in reader.tensors if t.name.endswith(".counts"))


def test_too_short_text_is_a_usage_error(f32_gguf, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(_text(20))
    out = tmp_path / "out" / "short.imatrix.gguf"
    with pytest.raises(UsageError) as caught:
        compute_imatrix(f32_gguf, text, out, dataset="short.txt", ctx=CTX, threads=2)
    message = str(caught.value)
    assert message.startswith("quantize.imatrix: the calibration text has ") and f"ctx {CTX}" in message
    assert "\n" not in message
    assert list(out.parent.iterdir()) == []  # neither the file nor a staging file


def test_imatrix_changes_the_quantization(f32_gguf, computed, tmp_path):
    imatrix = computed[0]
    quant = lookup_quant_type("q4_k_m")
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    quantize_gguf(f32_gguf, plain, quant, threads=2)
    quantize_gguf(f32_gguf, weighted, quant, imatrix=imatrix, threads=2)
    assert plain.stat().st_size == weighted.stat().st_size
    assert plain.read_bytes() != weighted.read_bytes()


def test_progress_follows_each_chunk(computed):
    assert computed[3] == [(i, CHUNKS) for i in range(1, CHUNKS + 1)]


def test_expert_statistics_follow_collect_imatrix():
    """MUL_MAT_ID: the per-expert sums and counts of collect_imatrix's loops, transcribed."""
    rng = np.random.default_rng(0)
    n_as, n_used, n_tokens, ne0 = 4, 2, 20, 8
    src1 = rng.standard_normal((n_tokens, 1, ne0)).astype(np.float32)  # broadcast over the chosen experts
    ids = np.stack([rng.choice(n_as - 1, n_used, replace=False) for _ in range(n_tokens)]).astype(np.int32)
    collector = Collector()
    collector.add_indirect("blk.0.ffn_up_exps.weight", n_as, src1, ids)
    collector.add_indirect("blk.0.ffn_up_exps.weight", n_as, src1, ids)
    sums, counts = collector.result()
    values, expected_counts = np.zeros((n_as, ne0)), np.zeros(n_as)
    for _ in range(2):
        for idx in range(n_used):
            for row in range(n_tokens):
                ex = ids[row, idx]
                expected_counts[ex] += 1
                values[ex] += src1[row, idx % 1].astype(np.float64) ** 2
    np.testing.assert_allclose(sums["blk.0.ffn_up_exps.weight"], values, rtol=1e-12)
    assert counts["blk.0.ffn_up_exps.weight"].tolist() == expected_counts.tolist()
    assert expected_counts[n_as - 1] == 0  # an expert never chosen keeps zeros, as in the tool


def test_dense_statistics_fold_3d_activations_into_one_matrix():
    """MUL_MAT over a 2-D weight: a [2, 3, rows, ne0] activation sums into one matrix, counted per row."""
    x = np.arange(2 * 3 * 16 * 4, dtype=np.float32).reshape(2, 3, 16, 4) / 100
    collector = Collector()
    collector.add_dense("blk.0.attn_q.weight", (4, 5, 1, 1), x)
    sums, counts = collector.result()
    np.testing.assert_allclose(sums["blk.0.attn_q.weight"], [(x.astype(np.float64) ** 2).sum(axis=(0, 1, 2))])
    assert counts["blk.0.attn_q.weight"].tolist() == [2 * 3 * 16]


def test_non_finite_activations_stop_the_collection():
    x = np.ones((1, 1, 16, 4), dtype=np.float32)
    x[0, 0, 3, 2] = np.inf
    with pytest.raises(CollectError, match="non-finite values detected in blk.0.attn_q.weight"):
        Collector().add_dense("blk.0.attn_q.weight", (4, 5, 1, 1), x)


def test_legacy_file_info(tmp_path):
    path = tmp_path / "legacy.dat"
    write_legacy_imatrix(path, {"blk.0.attn_q.weight": [1.0, 2.0], "blk.0.attn_k.weight": [3.0, 4.0]}, ncall=7)
    assert read_imatrix_info(path) == ImatrixInfo(2, 7, 0, ())
    path.write_bytes(b"\x00\x00\x00\x00")
    with pytest.raises(UsageError, match="legacy.dat"):
        read_imatrix_info(path)
