"""`demo init` writes a loadable model and a spec-shaped adapter; `plan --offline` lists tags."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from so8t_deploy.demo import init_demo

    return init_demo(tmp_path_factory.mktemp("demo") / "d")


def test_demo_model_loads_in_transformers(demo_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(demo_dir / "model")
    assert model.config.model_type == "phi3"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (256, 2)
    logits = model(torch.tensor([[1, 20, 30]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()

    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_dir / "model")
    for token in ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_demo_adapter_matches_the_v1_spec(demo_dir):
    adapter = demo_dir / "adapters" / "so8t"
    config = json.loads((adapter / "so8t_config.json").read_text())
    assert config["format"] == "so8t" and config["format_version"] == 1 and config["block_size"] == 8
    d = config["hidden_size"]
    assert d == 256 and d % 8 == 0
    expected_shapes = {
        r"layers\.\d+\.(attn_in|attn_out|mlp_in|mlp_out)\.generator": (d // 8, 8, 8),
        r"layers\.\d+\.(attn_in|attn_out|mlp_in|mlp_out)\.gate": (),
        r"layers\.\d+\.triality\.(vector|spinor_plus|spinor_minus)\.projector": (8, d),
        r"layers\.\d+\.triality\.(vector|spinor_plus|spinor_minus)\.generator": (8, 8),
        r"layers\.\d+\.triality\.(vector|spinor_plus|spinor_minus)\.gate": (),
        r"final\.generator": (d // 8, 8, 8),
        r"final\.gate": (),
    }
    with safe_open(adapter / "so8t_adapter.safetensors", framework="pt") as f:
        names = set(f.keys())
        for name in names:
            matches = [shape for pattern, shape in expected_shapes.items() if re.fullmatch(pattern, name)]
            assert matches, f"tensor outside the spec: {name}"
            tensor = f.get_tensor(name)
            assert tuple(tensor.shape) == matches[0], name
            assert tensor.dtype == torch.float32, name
    # every layer carries every group, and groups are complete
    for layer in range(2):
        for site in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            assert {f"layers.{layer}.{site}.generator", f"layers.{layer}.{site}.gate"} <= names
        for rep in ("vector", "spinor_plus", "spinor_minus"):
            assert {f"layers.{layer}.triality.{rep}.{p}" for p in ("projector", "generator", "gate")} <= names
    assert {"final.generator", "final.gate"} <= names


def test_demo_refuses_a_non_empty_directory(run_cli, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run_cli("demo", "init", tmp_path)
    assert result.code == 2
    assert str(tmp_path) in result.err and "not empty" in result.err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_offline_plan_lists_every_build_step_with_its_key(run_cli, demo_dir, tmp_path):
    result = run_cli("plan", demo_dir / "manifest.yaml", "--offline", "--json", "--cache-dir", tmp_path / "cache")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    steps = [(s["variant"], s["stage"], s["quant"]) for s in plan["builds"]]
    assert steps == [("full", "bake", None), ("full", "convert", "f16"), ("full", "quantize", "q8_0"),
                     ("light", "bake", None), ("light", "convert", "f16"), ("light", "quantize", "q8_0")]
    assert all(len(s["key"]) == 64 and not s["cached"] for s in plan["builds"])
    assert plan["hosts"] == [] and not (tmp_path / "cache" / "objects").exists()  # nothing built, no host asked
    assert run_cli("plan", demo_dir / "manifest.yaml", "--offline", "--check").code == 2  # a contradiction


def test_console_script_exit_codes(tmp_path):
    """The installed entry point itself: exit 2 and one line, no traceback, for a bad manifest."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: so8t-deploy/v1\nname: x\nsource: {model: m}\nquantize: [q9]\n")
    proc = subprocess.run([sys.executable, "-m", "so8t_deploy", "validate", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith(f"{bad}: quantize: ")
    proc = subprocess.run([sys.executable, "-m", "so8t_deploy", "validate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Missing argument" in proc.stderr


def test_demo_refuses_an_unknown_family(run_cli, tmp_path):
    result = run_cli("demo", "init", tmp_path / "d", "--family", "gpt5")
    assert result.code == 2
    assert result.err.startswith("--family: unknown family 'gpt5'") and "qwen3" in result.err
    assert not (tmp_path / "d").exists()


def test_demo_of_another_family_is_what_the_shipped_manifest_deploys(run_cli, tmp_path, monkeypatch):
    """`make demo FAMILY=qwen3`: demo init --family writes that family's model, and manifests/demo.yaml,
    pointed at it by SO8T_DEMO_DIR and SO8T_DEMO_NAME (as the Makefile sets them), validates and plans it."""
    from pathlib import Path

    demo = tmp_path / "demo-qwen3"
    assert run_cli("demo", "init", demo, "--family", "qwen3").code == 0
    assert json.loads((demo / "model" / "config.json").read_text())["model_type"] == "qwen3"
    manifest = Path(__file__).parents[1] / "manifests" / "demo.yaml"
    monkeypatch.setenv("SO8T_DEMO_DIR", str(demo))
    monkeypatch.setenv("SO8T_DEMO_NAME", "so8t-demo-qwen3")
    validated = run_cli("validate", manifest)
    assert validated.code == 0, validated.err
    assert f"{manifest}: model: Qwen3 (qwen3)" in validated.out
    assert "modelfile.template: qwen3: renders the model's chat template" in validated.err
    plan = run_cli("plan", manifest, "--offline", "--json", "--cache-dir", tmp_path / "cache")
    assert plan.code == 0, plan.err
    planned = json.loads(plan.out)
    assert planned["source"] == str(demo / "model")
    assert [(b["variant"], b["stage"]) for b in planned["builds"]][:2] == [("full", "bake"), ("full", "convert")]


def test_a_gemma2_demo_leaves_out_the_final_site(tmp_path):
    """Gemma 2's llama.cpp graph ties its output to the embeddings, so its demo adapter has no `final` map."""
    from so8t_deploy.demo import init_demo

    demo = init_demo(tmp_path / "demo-gemma2", "gemma2")
    with safe_open(demo / "adapters" / "so8t" / "so8t_adapter.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "final.generator" not in names and "layers.0.attn_out.generator" in names


def test_validate_reads_the_calibration_data_and_refuses_it_as_eval_text(demo_dir, run_cli):
    """`validate` renders chat calibration data through the model's template and checks the eval text is held out,
    in one line naming the field, before anything is built."""
    base = (demo_dir / "manifest.yaml").read_text()
    chat = demo_dir / "conversations.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                    '{"messages": [{"role": "user", "content": 5}]}\n')
    bad = demo_dir / "bad-chat.yaml"
    bad.write_text(base.replace("quantize: [f16, q8_0]",
                                "quantize: {types: [q4_k_m], imatrix: {chat: conversations.jsonl}}"))
    result = run_cli("validate", bad)
    assert result.code == 2 and result.err.strip().endswith(f"quantize.imatrix.chat: {chat}: line 2: every message "
                                                             "needs a role (system, user, assistant, tool) and a "
                                                             "string content")
    lines = [f"line {i} of a text that is both the calibration data and the eval text" for i in range(40)]
    (demo_dir / "calibration.txt").write_text("\n".join(lines))
    (demo_dir / "eval.txt").write_text("\n".join(lines[:10] + [f"a held-out line number {i}" for i in range(10)]))
    shared = demo_dir / "shared.yaml"
    shared.write_text(base.replace("quantize: [f16, q8_0]", "quantize: {types: [q4_k_m], imatrix: {text: "
                                   "calibration.txt}}\nquality: {eval_text: eval.txt}"))
    result = run_cli("validate", shared)
    assert result.code == 2 and "quality.eval_text: the text is part of the importance matrix's calibration data " \
        "(calibration.txt); evaluate on held-out text" in result.err
