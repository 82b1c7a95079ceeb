"""The importance matrix in the plan: its calibration data as the model sees it, and the keys that depend on it.

Fast: no llama.cpp and no model weights (the plan needs only digests and the model's chat files).
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from so8t_deploy.build.calibration import check_held_out, load_calibration
from so8t_deploy.build.plan import BuildInputs, plan_builds
from so8t_deploy.errors import ManifestError
from so8t_deploy.manifest.loader import load_manifest
from so8t_deploy.manifest.quant_types import parse_split_size
from so8t_deploy.store.workspace import Workspace

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def manifest_text(quantize: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: so8t-deploy/v1
        name: m
        source: {{model: ./model}}
        quantize: {quantize}
        """)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|end|>"}))
    return model


def load(tmp_path: Path, quantize: str):
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(quantize))
    return load_manifest(path)


def inputs(model_dir: Path, calibration=None) -> BuildInputs:
    return BuildInputs(str(model_dir), "0" * 64, (), source_dir=model_dir, chat_dir=model_dir,
                       calibration=calibration)


def test_chat_calibration_is_rendered_by_the_models_own_template(tmp_path, model_dir):
    conversations = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in conversations) + "\n\n")
    manifest = load(tmp_path, "{types: [q4_k_m], imatrix: {chat: chat.jsonl}}")
    calibration = load_calibration(manifest.quantize.imatrix, model_dir)
    assert calibration is not None
    assert calibration.text == ("<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n"
                                "<|system|>\nbe brief<|end|>\n<|user|>\nwhy?<|end|>\n")
    assert calibration.parse_special  # the rendered special tokens become the tokens a host feeds the model
    assert calibration.dataset == "chat.jsonl"
    assert calibration.digest == hashlib.sha256(calibration.text.encode()).hexdigest()
    assert load_calibration(manifest.quantize.imatrix, None) is None  # a hub model's template: not here yet


@pytest.mark.parametrize(("line", "fragment"), [
    ("{not json", "line 2: not JSON"),
    ('{"messages": []}', 'line 2: expected {"messages"'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2: every message needs a role"),
    ('{"messages": [{"role": "user", "content": 3}]}', "line 2: every message needs a role"),
])
def test_bad_chat_calibration_is_one_line_naming_the_field_and_line(tmp_path, model_dir, line, fragment):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    (tmp_path / "chat.jsonl").write_text(f"{good}\n{line}\n")
    manifest = load(tmp_path, "{types: [q4_k_m], imatrix: {chat: chat.jsonl}}")
    with pytest.raises(ManifestError) as error:
        load_calibration(manifest.quantize.imatrix, model_dir)
    message = str(error.value)
    assert message.startswith("quantize.imatrix.chat: ") and fragment in message and "\n" not in message


def test_chat_calibration_needs_a_chat_template(tmp_path):
    bare = tmp_path / "model"
    bare.mkdir()
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    manifest = load(tmp_path, "{types: [q4_k_m], imatrix: {chat: chat.jsonl}}")
    with pytest.raises(ManifestError, match="quantize.imatrix.chat: .* has no chat template"):
        load_calibration(manifest.quantize.imatrix, bare)


def test_unreadable_or_empty_calibration_text_names_the_field(tmp_path, model_dir):
    manifest = load(tmp_path, "{types: [q4_k_m], imatrix: {text: missing.txt}}")
    with pytest.raises(ManifestError, match=r"missing.txt: cannot read quantize.imatrix.text file"):
        load_calibration(manifest.quantize.imatrix, model_dir)
    (tmp_path / "missing.txt").write_text("  \n")
    with pytest.raises(ManifestError, match="quantize.imatrix.text: .* is empty"):
        load_calibration(manifest.quantize.imatrix, model_dir)


def test_the_imatrix_is_a_step_per_variant_and_every_quantize_key_depends_on_it(tmp_path, model_dir):
    (tmp_path / "cal.txt").write_text("calibration text " * 50)
    plain = load(tmp_path, "[f16, q4_k_m, q8_0]")
    declared = load(tmp_path, "{types: [f16, q4_k_m, q8_0, iq4_xs], imatrix: {text: cal.txt, ctx: 64}}")
    workspace = Workspace(tmp_path / "cache")
    calibration = load_calibration(declared.quantize.imatrix, model_dir)
    before = plan_builds(plain, inputs(model_dir), workspace)
    after = plan_builds(declared, inputs(model_dir, calibration), workspace)

    assert [s.stage for s in after.steps] == ["bake", "convert", "imatrix", "quantize", "quantize", "quantize"]
    matrix = after.steps[2]
    assert matrix.upstream == after.steps[1].key and all(s.upstream == matrix.key for s in after.steps[3:])
    assert before.steps[1].key == after.steps[1].key  # bake and convert do not depend on it
    keys_before = {t.quant: t.key for t in before.tags}
    for tag in after.tags:
        if tag.quant == "f16":  # the converted float GGUF: not quantized, no importance matrix
            assert tag.key == keys_before["f16"] and "so8t.imatrix_key" not in (tag.identity or {})
        else:
            assert tag.key != keys_before.get(tag.quant) and tag.imatrix_key == matrix.key
            assert tag.identity is not None and tag.identity["so8t.imatrix_key"] == matrix.key
    # eval's comparison: the same levels without it, at the keys a manifest without it would build
    assert {(b.quant, b.key) for b in after.baselines} == {
        ("q4_k_m", keys_before["q4_k_m"]), ("q8_0", keys_before["q8_0"]),
        ("iq4_xs", next(b.key for b in after.baselines if b.quant == "iq4_xs"))}

    other = load_calibration(declared.quantize.imatrix.model_copy(update={"ctx": 128}), model_dir)
    assert plan_builds(declared.model_copy(update={"quantize": declared.quantize.model_copy(
        update={"imatrix": declared.quantize.imatrix.model_copy(update={"ctx": 128})})}),
        inputs(model_dir, other), workspace).steps[2].key != matrix.key
    (tmp_path / "cal.txt").write_text("other calibration text " * 50)
    changed = load_calibration(declared.quantize.imatrix, model_dir)
    assert plan_builds(declared, inputs(model_dir, changed), workspace).steps[2].key != matrix.key


def test_a_split_size_changes_the_keys_and_its_absence_keeps_them(tmp_path, model_dir):
    workspace = Workspace(tmp_path / "cache")
    plain = plan_builds(load(tmp_path, "[f16, q8_0]"), inputs(model_dir), workspace)
    split = plan_builds(load(tmp_path, "{types: [f16, q8_0], split_max_size: 50G}"), inputs(model_dir), workspace)
    mapping = plan_builds(load(tmp_path, "{types: [f16, q8_0]}"), inputs(model_dir), workspace)
    assert [s.key for s in mapping.steps] == [s.key for s in plain.steps]
    assert [s.key for s in split.steps][1:] != [s.key for s in plain.steps][1:]


def test_evaluating_on_the_calibration_text_is_refused(tmp_path, model_dir):
    (tmp_path / "cal.txt").write_text("alpha beta gamma\n" * 40)
    manifest = load(tmp_path, "{types: [q4_k_m], imatrix: {text: cal.txt}}")
    calibration = load_calibration(manifest.quantize.imatrix, model_dir)
    check_held_out("something else entirely", calibration)
    with pytest.raises(ManifestError, match="quality.eval_text: the text is part of .*cal.txt"):
        check_held_out("alpha beta gamma\n" * 3, calibration)


@pytest.mark.parametrize(("text", "n_bytes"), [("50G", 50 * 10**9), ("128M", 128 * 10**6), ("1M", 10**6),
                                               (" 2G ", 2 * 10**9)])
def test_a_split_size_reads_as_gguf_split_reads_it(text, n_bytes):
    assert parse_split_size(text) == n_bytes  # decimal units, as split_str_to_n_bytes


@pytest.mark.parametrize("text", ["50", "50GB", "50g", "1.5G", "0G", "-1G", "G", "", "50K", "50Gi"])
def test_a_split_size_gguf_split_would_misread_is_refused(text):
    with pytest.raises(ValueError, match="such as 500M or 50G"):  # gguf-split's sscanf reads "1.5G" as 1G
        parse_split_size(text)


def test_a_hosts_copy_matches_only_with_the_same_importance_matrix_or_none():
    from so8t_deploy.external.ollama_show import ShownModel
    from so8t_deploy.rollout.desired import DesiredModel
    from so8t_deploy.rollout.host_plan import matches_shown

    base = {"so8t.bake_key": "b" * 64, "so8t.llama_cpp": "llama-cpp-python 0.3.36", "general.file_type": "15"}
    desired = DesiredModel(tag="m:q4_k_m", gguf_name="m.gguf", template="T", system=None, identity=base)
    with_matrix = DesiredModel(tag="m:q4_k_m", gguf_name="m.gguf", template="T", system=None,
                               identity=base | {"so8t.imatrix_key": "i" * 64})
    plain, quantized_with = ShownModel("T", None, model_info=base), \
        ShownModel("T", None, model_info=base | {"so8t.imatrix_key": "i" * 64})
    assert matches_shown(plain, desired) and matches_shown(quantized_with, with_matrix)
    assert not matches_shown(quantized_with, desired)  # the manifest dropped its importance matrix: redeploy
    assert not matches_shown(plain, with_matrix)
    other = ShownModel("T", None, model_info=base | {"so8t.imatrix_key": "j" * 64})
    assert not matches_shown(other, with_matrix)  # new calibration data: redeploy


def test_the_manifest_digest_of_a_plain_ladder_is_what_it_was_before_the_mapping(tmp_path):
    import json

    from so8t_deploy.deploy.plan import manifest_digest

    listed, mapped = load(tmp_path, "[f16, q8_0]"), load(tmp_path, "{types: [f16, q8_0]}")
    assert manifest_digest(listed) == manifest_digest(mapped)
    data = listed.model_dump(mode="json", by_alias=True)
    data["quantize"] = ["f16", "q8_0"]  # how a manifest dumped before quantize could be a mapping
    del data["distribution"]
    assert manifest_digest(listed) == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert manifest_digest(load(tmp_path, "{types: [f16, q8_0], split_max_size: 50G}")) != manifest_digest(listed)


def test_a_ladder_of_float_levels_has_no_imatrix_step(tmp_path, model_dir):
    (tmp_path / "cal.txt").write_text("calibration text " * 50)
    manifest = load(tmp_path, "{types: [f32, f16], imatrix: {text: cal.txt}}")
    plan = plan_builds(manifest, inputs(model_dir, load_calibration(manifest.quantize.imatrix, model_dir)),
                       Workspace(tmp_path / "cache"))
    assert "imatrix" not in [s.stage for s in plan.steps] and plan.baselines == []
    assert all(t.imatrix_key is None and "so8t.imatrix_key" not in (t.identity or {}) for t in plan.tags)


def test_eval_text_sharing_a_tenth_of_its_lines_with_the_calibration_is_refused(tmp_path, model_dir):
    calibration_lines = [f"calibration sentence number {i} about rotations" for i in range(50)]
    (tmp_path / "cal.txt").write_text("\n".join(calibration_lines) + "\n")
    manifest = load(tmp_path, "{types: [q4_k_m], imatrix: {text: cal.txt}}")
    calibration = load_calibration(manifest.quantize.imatrix, model_dir)
    fresh = [f"held-out sentence number {i} about spinors" for i in range(20)]
    check_held_out("\n".join(fresh), calibration)
    with pytest.raises(ManifestError, match="held-out text"):
        check_held_out("\n".join(fresh + calibration_lines[:3]), calibration)
