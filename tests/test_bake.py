"""The streaming bake on tiny random models: exact (by logits), byte-preserving, atomic."""

from __future__ import annotations

import json
import subprocess
import sys

import blake3
import pytest
import torch

from so8t_deploy.bake.bake import PROVENANCE_FILE, bake_model
from so8t_deploy.bake.model_dir import open_model_dir
from so8t_deploy.bake.verify import verify_bake
from so8t_deploy.manifest.schema import Scales

FULL = Scales()


def tensor_bytes(model_dir) -> dict[str, bytes]:
    """Raw bytes of every tensor, read through the headers (independent of shard layout)."""
    out = {}
    for shard in open_model_dir(model_dir).shards:
        data = shard.path.read_bytes()
        for name, entry in shard.tensors.items():
            out[name] = data[entry.start:entry.end]
    return out


def assert_exact(model, adapters, baked, scales=FULL, min_effect=0.1):
    report = verify_bake(model, [(None, a) for a in adapters], baked, scales)
    assert report.max_abs_diff <= 1e-4, report
    assert report.adapter_effect > min_effect, "the adapter must visibly change the logits"
    return report


def test_phi3_every_site_and_triality_is_exact(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("phi3", num_kv_heads=2)  # GQA: the q/k/v row split is uneven
    adapter = so8t_adapter(64, 2)
    result = bake_model(model, [(None, adapter)], tmp_path / "baked", FULL)
    assert result.folded == 9 and result.copied == 6  # 4 projections x 2 layers + lm_head
    assert_exact(model, [adapter], tmp_path / "baked")


@pytest.mark.parametrize("rep", ["vector", "spinor_plus", "spinor_minus"])
def test_each_triality_rep_alone_is_exact(tiny_model, so8t_adapter, tmp_path, rep):
    model = tiny_model("phi3", num_kv_heads=2)
    adapter = so8t_adapter(64, 2, sites=(), triality=(rep,), final=False, strength=2.0)
    bake_model(model, [(None, adapter)], tmp_path / "baked", FULL)
    assert_exact(model, [adapter], tmp_path / "baked", min_effect=1e-3)


def test_llama_tied_embeddings_get_an_untied_head(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in tensor_bytes(model)
    adapter = so8t_adapter(64, 2)
    bake_model(model, [(None, adapter)], tmp_path / "baked", FULL)
    baked = tensor_bytes(tmp_path / "baked")
    assert "lm_head.weight" in baked
    assert baked["model.embed_tokens.weight"] == tensor_bytes(model)["model.embed_tokens.weight"]
    config = json.loads((tmp_path / "baked" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert_exact(model, [adapter], tmp_path / "baked")


def test_tied_model_without_final_stays_tied(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    adapter = so8t_adapter(64, 2, final=False)
    bake_model(model, [(None, adapter)], tmp_path / "baked", FULL)
    assert "lm_head.weight" not in tensor_bytes(tmp_path / "baked")
    assert (tmp_path / "baked" / "config.json").read_bytes() == (model / "config.json").read_bytes()


def test_qwen2_biases_are_exact(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("qwen2")
    source = tensor_bytes(model)
    assert "model.layers.0.self_attn.q_proj.bias" in source
    adapter = so8t_adapter(64, 2)
    bake_model(model, [(None, adapter)], tmp_path / "baked", FULL)
    baked = tensor_bytes(tmp_path / "baked")
    for name in ("q_proj", "k_proj", "v_proj"):  # input-side maps leave input biases alone
        assert baked[f"model.layers.1.self_attn.{name}.bias"] == source[f"model.layers.1.self_attn.{name}.bias"]
    assert_exact(model, [adapter], tmp_path / "baked")


def test_mistral_is_exact(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("mistral", num_kv_heads=2)
    adapter = so8t_adapter(64, 2)
    bake_model(model, [(None, adapter)], tmp_path / "baked", FULL)
    assert_exact(model, [adapter], tmp_path / "baked")


def test_scale_zero_is_byte_identical(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("phi3")
    zero = Scales(rotation=0, ffn=0, triality=0)
    result = bake_model(model, [(None, so8t_adapter(64, 2))], tmp_path / "baked", zero)
    assert result.folded == 0
    assert tensor_bytes(tmp_path / "baked") == tensor_bytes(model)
    assert (tmp_path / "baked" / "config.json").read_bytes() == (model / "config.json").read_bytes()


def test_partial_scales_touch_only_their_groups(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("phi3")
    adapter = so8t_adapter(64, 2)
    scales = Scales(rotation=0, ffn=0.5, triality=0)
    bake_model(model, [(None, adapter)], tmp_path / "baked", scales)
    source, baked = tensor_bytes(model), tensor_bytes(tmp_path / "baked")
    changed = {name for name in source if source[name] != baked[name]}
    assert changed == {f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    assert_exact(model, [adapter], tmp_path / "baked", scales)


def test_untouched_tensors_and_files_are_copied_unchanged(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("phi3")
    bake_model(model, [(None, so8t_adapter(64, 2))], tmp_path / "baked", FULL)
    source, baked = tensor_bytes(model), tensor_bytes(tmp_path / "baked")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert baked[name] == source[name]
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (tmp_path / "baked" / name).read_bytes() == (model / name).read_bytes()


def test_sharded_bf16_model_keeps_shards_dtype_and_a_correct_index(tiny_model, so8t_adapter, tmp_path):
    import transformers

    model = tiny_model("phi3", dtype="bfloat16", max_shard_size="60KB")
    assert len(open_model_dir(model).shards) > 2
    adapter = so8t_adapter(64, 2)
    bake_model(model, [(None, adapter)], tmp_path / "baked", FULL)
    index = json.loads((tmp_path / "baked" / "model.safetensors.index.json").read_text())
    baked = open_model_dir(tmp_path / "baked")  # validates every index entry against the shards
    assert index["metadata"]["total_size"] == sum(e.nbytes for s in baked.shards for e in s.tensors.values())
    assert {e.dtype for s in baked.shards for e in s.tensors.values()} == {"BF16"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "baked")
    assert loaded.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    report = verify_bake(model, [(None, adapter)], tmp_path / "baked", FULL)
    assert report.baked_dtype == "BF16" and report.passed, report


def test_dtype_override_casts_and_records_it(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("phi3", dtype="bfloat16")
    adapter = so8t_adapter(64, 2)
    bake_model(model, [(None, adapter)], tmp_path / "baked", FULL, dtype="float32")
    baked = open_model_dir(tmp_path / "baked")
    assert {e.dtype for s in baked.shards for e in s.tensors.values()} == {"F32"}
    assert baked.config["dtype"] == "float32"
    assert_exact(model, [adapter], tmp_path / "baked")


def test_provenance_records_inputs(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("phi3")
    adapter = so8t_adapter(64, 2)
    bake_model(model, [(None, adapter)], tmp_path / "baked", Scales(rotation=0.1))
    provenance = json.loads((tmp_path / "baked" / PROVENANCE_FILE).read_text())
    # The shard's BLAKE3 is taken while it streams: it must be the whole file's.
    whole_file = blake3.blake3((model / "model.safetensors").read_bytes()).hexdigest()
    assert provenance["model_files"]["model.safetensors"] == f"blake3:{whole_file}"
    assert provenance["adapters"][0]["files"]["so8t_adapter.safetensors"] == "blake3:" + blake3.blake3(
        (adapter / "so8t_adapter.safetensors").read_bytes()).hexdigest()
    assert provenance["scales"] == {"rotation": 0.1, "ffn": 1.0, "triality": 1.0}
    assert provenance["tool"]["name"] == "so8t-deploy" and provenance["tool"]["version"]


def test_interrupted_bake_leaves_nothing_behind(tiny_model, so8t_adapter, tmp_path):
    model = tiny_model("phi3")
    calls = []

    def interrupt(nbytes):
        calls.append(nbytes)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bake_model(model, [(None, so8t_adapter(64, 2))], tmp_path / "baked", FULL, on_progress=interrupt)
    assert list(tmp_path.iterdir()) == []


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from so8t_deploy.bake.bake import bake_model
from so8t_deploy.manifest.schema import Scales
seen = []
def die(n):
    seen.append(n)
    if len(seen) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
bake_model(Path(sys.argv[1]), [(None, Path(sys.argv[2]))], Path(sys.argv[3]), Scales(), on_progress=die)
"""


@pytest.mark.slow  # a child process that imports torch
def test_killed_bake_is_never_trusted_and_a_rerun_converges(tiny_model, so8t_adapter, tmp_path, run_cli):
    model, adapter, out = tiny_model("phi3"), so8t_adapter(64, 2), tmp_path / "baked"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, model, adapter, out], capture_output=True)
    assert proc.returncode == -9
    assert not out.exists()  # only a hidden staging directory can remain
    assert [p.name.startswith(".baked.partial-") for p in tmp_path.iterdir()] == [True]
    result = run_cli("bake", "--model", model, "--adapter", adapter, "--out", out)
    assert result.code == 0, result.err
    assert [p.name for p in tmp_path.iterdir()] == ["baked"]
    assert_exact(model, [adapter], out)


def test_rebake_replaces_a_previous_bake_but_not_foreign_data(tiny_model, so8t_adapter, tmp_path, run_cli):
    model, adapter = tiny_model("phi3"), so8t_adapter(64, 2)
    out = tmp_path / "baked"
    assert run_cli("bake", "--model", model, "--adapter", adapter, "--out", out, "--scales", "rotation=0").code == 0
    assert run_cli("bake", "--model", model, "--adapter", adapter, "--out", out).code == 0
    assert json.loads((out / PROVENANCE_FILE).read_text())["scales"]["rotation"] == 1.0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    result = run_cli("bake", "--model", model, "--adapter", adapter, "--out", foreign)
    assert result.code == 2 and "not a bake output" in result.err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_cli_bake_and_verify(tiny_model, so8t_adapter, tmp_path, run_cli):
    model, adapter, out = tiny_model("llama"), so8t_adapter(64, 2), tmp_path / "baked"
    scales = "rotation=0.5,ffn=0.25,triality=2"
    result = run_cli("bake", "--model", model, "--adapter", adapter, "--out", out, "--scales", scales)
    assert result.code == 0, result.err
    assert "tensors folded" in result.out
    result = run_cli("verify", "--model", model, "--adapter", adapter, "--baked", out, "--scales", scales)
    assert result.code == 0, result.err
    assert "max |Δlogit|" in result.out and "adapter effect" in result.out
    # the same bake checked against other scales is not equivalent: exit 1, one line
    result = run_cli("verify", "--model", model, "--adapter", adapter, "--baked", out)
    assert result.code == 1
    assert "not equivalent" in result.err and len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scales", "rot=1"], "--scales: rot: unknown group"),
        (["--scales", "rotation"], "--scales: expected group=value"),
        (["--scales", "ffn=abc"], "--scales: ffn"),
        (["--dtype", "int8"], "--dtype: must be auto, bfloat16, float16, float32; got 'int8'"),
    ],
)
def test_cli_bad_options_exit_2(tiny_model, so8t_adapter, tmp_path, run_cli, args, message):
    result = run_cli("bake", "--model", tiny_model("phi3"), "--adapter", so8t_adapter(64, 2),
                     "--out", tmp_path / "o", *args)
    assert result.code == 2 and result.err.startswith(message)
    assert not (tmp_path / "o").exists()


def test_the_library_names_the_setting_and_the_cli_its_flag(tiny_model, tmp_path):
    """Domain errors name the setting (a library caller has no flags); the command maps it to its flag."""
    from so8t_deploy.cli.typer_app import flags
    from so8t_deploy.errors import SettingError, UsageError

    with pytest.raises(SettingError) as error:
        bake_model(tiny_model("phi3"), [], tmp_path / "o", FULL, dtype="int8")
    assert str(error.value).startswith("dtype: must be auto") and error.value.setting == "dtype"
    with pytest.raises(UsageError) as mapped, flags(dtype="--dtype"):
        bake_model(tiny_model("phi3"), [], tmp_path / "o", FULL, dtype="int8")
    assert str(mapped.value).startswith("--dtype: must be auto") and not isinstance(mapped.value, SettingError)
    with pytest.raises(SettingError), flags(outtype="--outtype"):  # another setting passes through as it is
        bake_model(tiny_model("phi3"), [], tmp_path / "o", FULL, dtype="int8")


def test_adapter_digest_is_the_one_the_build_keys_on(tiny_model, so8t_adapter, tmp_path):
    """One digest per adapter, whichever path takes it: the bake's provenance and the build's cache key."""
    from so8t_deploy.store.hashing import DigestCache, combined_digest

    model, adapter = tiny_model("phi3"), so8t_adapter(64, 2)
    (adapter / "README.md").write_text("notes saved beside the adapter\n")
    bake_model(model, [(None, adapter)], tmp_path / "baked", FULL)
    recorded = json.loads((tmp_path / "baked" / PROVENANCE_FILE).read_text())["adapters"][0]
    build_digest = combined_digest(DigestCache(tmp_path / "digests.json").directory(adapter))  # as build.py takes it
    assert recorded["digest"] == build_digest
    assert set(recorded["files"]) == {"so8t_config.json", "so8t_adapter.safetensors", "README.md"}


def test_the_worker_step_passes_the_base_mismatch_opt_out(tiny_model, so8t_adapter, tmp_path, run_cli):
    from so8t_deploy.build.steps import BakeStep, StepEnvelope
    from so8t_deploy.manifest.schema import AdapterRef

    model = tiny_model("phi3")
    adapter = so8t_adapter(64, 2, base_model="org/renamed-copy")

    def spec(allow: bool, out: str):
        step = BakeStep(model_dir=model, out_dir=tmp_path / out, scales=FULL, dtype="auto",
                        digests_file=tmp_path / "d.json",
                        adapters=[AdapterRef(kind="so8t", path=adapter, allow_base_mismatch=allow)])
        path = tmp_path / f"{out}.json"
        path.write_text(StepEnvelope(step=step, result_file=tmp_path / f"{out}.result.json").model_dump_json())
        return path

    refused = run_cli("worker", "run", spec(False, "o"))
    assert refused.code == 2 and "base_model 'org/renamed-copy' does not match" in refused.err
    assert "allow_base_mismatch: true" in refused.err
    assert run_cli("worker", "run", spec(True, "o1")).code == 0
    assert json.loads((tmp_path / "o1.result.json").read_text())["folded"] > 0
    assert run_cli("bake", "--model", model, "--adapter", adapter, "--out", tmp_path / "o2",
                   "--allow-base-mismatch").code == 0


def test_hub_cache_directory_name_counts_as_the_base_model_name(tiny_model, so8t_adapter, tmp_path):
    import shutil

    snapshot = tmp_path / "hub" / "models--org--tiny-phi3" / "snapshots" / "0123abc"
    shutil.copytree(tiny_model("phi3"), snapshot)
    adapter = so8t_adapter(64, 2, base_model="org/tiny-phi3")
    bake_model(snapshot, [(None, adapter)], tmp_path / "baked", FULL)
    assert_exact(snapshot, [adapter], tmp_path / "baked")
