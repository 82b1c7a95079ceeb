"""The quant quality gate: KL divergence and top-1 agreement against the float GGUF, with a report."""

from __future__ import annotations

import json

import numpy as np
import ollama
import pytest

from so8t_deploy.build.quality_metrics import compare, kl_divergence, log_softmax

from .ollama_server import ServerPool

LADDER = "[f16, q8_0, q6_k, q4_k_m]"


def test_kl_divergence_matches_the_definition():
    rng = np.random.default_rng(0)
    p_logits, q_logits = rng.normal(size=(5, 11)), rng.normal(size=(5, 11))
    p, q = np.exp(log_softmax(p_logits)), np.exp(log_softmax(q_logits))
    expected = (p * np.log(p / q)).sum(-1)
    assert np.allclose(kl_divergence(p_logits, q_logits), expected)
    assert np.allclose(kl_divergence(p_logits, p_logits + 3.0), 0.0)  # a shift does not change the softmax
    stats = compare([p_logits], [p_logits], [[1, 2, 3, 4, 5]])
    assert stats["mean_kl"] == 0 and stats["top1"] == 1.0


def write_manifest(path, demo, *, quality="{windows: 4, context: 128}", urls=()):
    targets = "\n".join(f"  - {{name: host-{i}, host: '{url}'}}" for i, url in enumerate(urls)) or "  []"
    path.write_text(f"""\
apiVersion: so8t-deploy/v1
name: qual
source:
  model: {demo / 'model'}
  adapters: [{{kind: so8t, path: {demo / 'adapters' / 'so8t'}}}]
quantize: {LADDER}
quality: {quality}
targets:
{targets}
smoke:
  - {{prompt: "hi", expect: ".", timeout_s: 60}}
""")
    return path


@pytest.mark.llamacpp
def test_kl_grows_as_bits_shrink_and_the_report_is_written(demo, tmp_path, run_cli):
    manifest = write_manifest(tmp_path / "m.yaml", demo)
    cache = tmp_path / "cache"
    result = run_cli("eval", manifest, "--cache-dir", cache, "--json", "--report", tmp_path / "report")
    assert result.code == 0, result.err
    assert "n_ctx_train" not in result.err and "llama_" not in result.err  # llama.cpp's log only with -v
    by_quant = {r["quant"]: r for r in json.loads(result.out)}
    assert by_quant["f16"]["mean_kl"] < 1e-9 and by_quant["f16"]["top1"] == 1.0  # the reference against itself
    assert 0 < by_quant["q8_0"]["mean_kl"] < by_quant["q6_k"]["mean_kl"] < by_quant["q4_k_m"]["mean_kl"]
    assert by_quant["q8_0"]["top1"] > by_quant["q4_k_m"]["top1"]
    assert all(r["p99_kl"] >= r["mean_kl"] and r["perplexity"] > 1 and r["tokens_per_second"] > 0
               for r in by_quant.values())
    png = (tmp_path / "report" / "quality.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "| qual:q4_k_m | q4_k_m | f16 |" in (tmp_path / "report" / "quality.md").read_text()
    assert len(json.loads((tmp_path / "report" / "quality.json").read_text())) == 4
    assert len(list((cache / "objects" / "eval").iterdir())) == 4  # cached by content
    again = run_cli("eval", manifest, "--cache-dir", cache, "--json")
    assert json.loads(again.out) == json.loads(result.out)


@pytest.mark.llamacpp
def test_the_gate_holds_back_failing_tags_and_force_overrides_it(demo, tmp_path, run_cli):
    pool = ServerPool(tmp_path / "hosts")
    try:
        [url] = pool.start(1)
        # q4_k_m loses far more than q8_0 on this model (about 0.07 vs 0.001 nats): gate between them
        manifest = write_manifest(tmp_path / "m.yaml", demo, urls=[url],
                                  quality="{windows: 4, context: 128, max_mean_kl: 0.02}")
        cache = tmp_path / "cache"
        result = run_cli("apply", manifest, "--cache-dir", cache, "--json")
        assert result.code == 1
        report = json.loads(result.out)
        assert set(report["gated"]) == {"qual:q4_k_m"} and "mean KL" in report["gated"]["qual:q4_k_m"][0]
        assert "quality gate held back qual:q4_k_m" in result.err
        deployed = {m.model for m in ollama.Client(host=url, timeout=30).list().models}
        assert deployed == {"qual:f16", "qual:q8_0", "qual:q6_k"}

        result = run_cli("apply", manifest, "--cache-dir", cache, "--force")
        assert result.code == 0, result.err
        assert "forced: rolling out qual:q4_k_m although it fails the quality gate" in result.err
        assert "qual:q4_k_m" in {m.model for m in ollama.Client(host=url, timeout=30).list().models}
    finally:
        pool.stop_all()
