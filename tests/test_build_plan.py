"""The build plan as apply runs it: every step's key hashes the step's content, every tag is its step's, and
a saved plan that is not the manifest's, or whose inputs moved since, is told apart without planning again.

Fast: digests only, no model weights and no llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from so8t_deploy import __version__
from so8t_deploy.build.calibration import load_calibration
from so8t_deploy.build.plan import BuildInputs, BuildPlan, PlannedQuantize, plan_builds
from so8t_deploy.manifest.loader import load_manifest
from so8t_deploy.manifest.schema import Manifest
from so8t_deploy.store.workspace import Workspace, cache_key

LADDER = "{types: [f16, q8_0, q4_k_m], imatrix: {text: calibration.txt}}"


def write_manifest(tmp_path: Path, quantize: str = LADDER) -> Manifest:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "calibration.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 4)
    path = tmp_path / "m.yaml"
    path.write_text("apiVersion: so8t-deploy/v1\nname: m\nsource: {model: ./model}\n"
                    "bake: {variants: {full: {}, light: {rotation: 0.25}}}\n"
                    f"quantize: {quantize}\n")
    return load_manifest(path)


def inputs_for(manifest: Manifest, model_digest: str = "0" * 64) -> BuildInputs:
    imatrix = manifest.quantize.imatrix
    calibration = load_calibration(imatrix, None) if imatrix is not None else None
    return BuildInputs("./model", model_digest, (), calibration=calibration)


@pytest.fixture
def planned(tmp_path) -> tuple[Manifest, BuildPlan]:
    manifest = write_manifest(tmp_path)
    return manifest, plan_builds(manifest, inputs_for(manifest), Workspace(tmp_path / "cache"))


def saved_form(plan: BuildPlan) -> dict:
    return json.loads(plan.model_dump_json())


def test_a_key_hashes_exactly_what_its_step_runs_and_survives_a_save(planned):
    manifest, plan = planned
    assert [(s.stage, s.variant, s.quant) for s in plan.steps[:5]] == [
        ("bake", "full", None), ("convert", "full", "f16"), ("imatrix", "full", None),
        ("quantize", "full", "q8_0"), ("quantize", "full", "q4_k_m")]
    bake, convert = plan.steps[0], plan.steps[1]
    # The key formula of the workspace's artifacts is unchanged: caches built before stay valid.
    assert bake.key == cache_key(stage="bake", tool=__version__, model="0" * 64, adapters=[],
                                 scales={"rotation": 1.0, "ffn": 1.0, "triality": 1.0}, dtype=manifest.bake.dtype)
    assert convert.upstream == bake.key and plan.tag("m:full-f16").key == convert.key
    assert plan.tag("m:full-q4_k_m").identity == {"so8t.bake_key": bake.key, "so8t.llama_cpp": convert.llama,
                                                  "general.file_type": "15", "so8t.imatrix_key": plan.steps[2].key}
    assert BuildPlan.model_validate_json(plan.model_dump_json()) == plan


@pytest.mark.parametrize(("index", "field", "value"), [
    (0, "scales", {"rotation": 0.5, "ffn": 1.0, "triality": 1.0}),
    (0, "dtype", "float32"),
    (1, "metadata", {"so8t.variant": "light"}),
    (1, "quant", "f32"),
    (2, "ctx", 4096),
    (3, "quant", "q2_k"),
    (4, "imatrix", None),
])
def test_a_step_edited_after_planning_is_refused_when_read(planned, index, field, value):
    _, plan = planned
    data = saved_form(plan)
    data["steps"][index][field] = value
    with pytest.raises(ValidationError) as error:
        BuildPlan.model_validate(data)
    assert [e["type"] for e in error.value.errors()] == ["edited_step"]
    assert "its key does not hash its content" in error.value.errors()[0]["msg"]


def rekeyed(step: dict, **changes: object) -> dict:
    """`step` changed and keyed again, as someone who knows the key formula would edit it."""
    edited = PlannedQuantize.model_validate({**step, **changes, "key": None})
    return {**step, **changes, "key": cache_key(**edited.content())}


def test_a_plan_whose_tags_are_not_their_steps_is_refused(planned):
    _, plan = planned
    data = saved_form(plan)
    q8, q4 = data["steps"][3], data["steps"][4]
    cases = {
        "a tag pointing at another level's step": lambda d: d["tags"][1].update(key=q4["key"]),
        "an identity of its own": lambda d: d["tags"][1]["identity"].update({"so8t.bake_key": "0" * 64}),
        "a step reading a step the plan lacks": lambda d: d["steps"].__setitem__(3, rekeyed(q8, convert="1" * 64)),
        "two steps with one key": lambda d: d["steps"].__setitem__(9, d["steps"][3]),
    }
    for case, edit in cases.items():
        edited = json.loads(json.dumps(data))
        edit(edited)
        with pytest.raises(ValidationError) as error:
            BuildPlan.model_validate(edited)
        assert [e["type"] for e in error.value.errors()] == ["edited_plan"], case


def test_check_tells_a_plan_not_the_manifests_from_inputs_that_moved(planned, tmp_path):
    manifest, plan = planned
    assert plan.check(manifest, inputs_for(manifest)) == ([], [])

    # Consistent, keys and all, but a step the manifest does not make: not the manifest's.
    data = saved_form(plan)
    old = data["steps"][3]["key"]
    data["steps"][3] = rekeyed(data["steps"][3], split_max_size=1 << 30)
    data["tags"] = [{**t, "key": data["steps"][3]["key"]} if t["key"] == old else t for t in data["tags"]]
    misfits, moved = BuildPlan.model_validate(data).check(manifest, inputs_for(manifest))
    assert misfits == ["the quantize step of full (q8_0): not the manifest's (split_max_size)"] and moved == []

    # The model changed since: every bake step moved, and nothing else is blamed.
    misfits, moved = plan.check(manifest, inputs_for(manifest, model_digest="f" * 64))
    assert misfits == []
    assert moved == ["the inputs of the bake step of full (model)", "the inputs of the bake step of light (model)"]

    # A manifest that asks for other levels: the steps are not its steps.
    other = write_manifest(tmp_path, "{types: [f16, q8_0], imatrix: {text: calibration.txt}}")
    misfits, _ = plan.check(other, inputs_for(other))
    assert misfits == ["its build steps are not the manifest's (not in the manifest: quantize full q4_k_m, "
                       "quantize light q4_k_m; missing: -)"]
