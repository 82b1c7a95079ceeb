"""`build`: every tag's GGUF through the content-addressed cache; re-runs rebuild only what changed."""

from __future__ import annotations

import json

import pytest

from so8t_deploy.build import build
from so8t_deploy.errors import BuildError
from so8t_deploy.external.gguf_info import read_gguf_info
from so8t_deploy.hashing import sha256_file
from so8t_deploy.manifest_loader import load_manifest
from so8t_deploy.runner import LocalRunner

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from so8t_deploy.demo import init_demo

    return init_demo(tmp_path_factory.mktemp("demo") / "demo")


def write_manifest(demo, path, light="{rotation: 0.1, ffn: 0.05, triality: 0.02}", quantize="[f16, q8_0]"):
    text = (demo / "manifest.yaml").read_text()
    text = text.replace("light: {rotation: 0.1, ffn: 0.05, triality: 0.02}", f"light: {light}")
    text = text.replace("quantize: [f16, q8_0]", f"quantize: {quantize}")
    text = text.replace("./model", str(demo / "model")).replace("./adapters", str(demo / "adapters"))
    path.write_text(text)
    return path


def test_build_makes_every_tag_and_a_rerun_rebuilds_nothing(demo, tmp_path, run_cli):
    manifest = write_manifest(demo, tmp_path / "m.yaml")
    cache = tmp_path / "cache"
    result = run_cli("build", manifest, "--cache-dir", cache, "--json")
    assert result.code == 0, result.err
    first = json.loads(result.out)
    tags = [a["tag"] for a in first["artifacts"]]
    assert tags == ["so8t-demo:full-f16", "so8t-demo:full-q8_0", "so8t-demo:light-f16", "so8t-demo:light-q8_0"]
    assert first["built"] == 6 and first["reused"] == 0  # 2 x (bake, convert, quantize)
    for artifact in first["artifacts"]:
        path = cache / artifact["path"].split(str(cache) + "/", 1)[1]
        assert sha256_file(path) == artifact["sha256"]
        assert read_gguf_info(path).file_type == {"f16": 1, "q8_0": 7}[artifact["quant"]]
        assert read_gguf_info(path).metadata["so8t.variant"] == artifact["variant"]

    result = run_cli("build", manifest, "--cache-dir", cache)
    assert result.code == 0
    assert "nothing to rebuild: all 6 steps are up to date" in result.out
    assert "so8t-demo:light-q8_0" in result.out


def test_changing_one_variant_rebuilds_only_that_variant(demo, tmp_path):
    cache = tmp_path / "cache"
    first = build(load_manifest(write_manifest(demo, tmp_path / "a.yaml")), cache)
    changed = build(load_manifest(write_manifest(demo, tmp_path / "b.yaml", light="{rotation: 0.2}")), cache)
    assert (changed.built, changed.reused) == (3, 3)
    by_tag = {a.tag: a for a in first.artifacts}
    for artifact in changed.artifacts:
        same = artifact.sha256 == by_tag[artifact.tag].sha256
        assert same == (artifact.variant == "full"), artifact.tag
    grown = build(load_manifest(write_manifest(demo, tmp_path / "c.yaml", light="{rotation: 0.2}",
                                               quantize="[f16, q8_0, q4_k_m]")), cache)
    assert (grown.built, grown.reused) == (2, 6)  # one new quant level per variant


class FailingQuantize(LocalRunner):
    def quantize(self, in_file, out_file, quant):
        out_file.write_bytes(b"half a file")
        raise BuildError("quantizer died")


def test_a_failed_step_leaves_nothing_trusted_and_a_rerun_converges(demo, tmp_path):
    manifest = load_manifest(write_manifest(demo, tmp_path / "m.yaml"))
    cache = tmp_path / "cache"
    with pytest.raises(BuildError):
        build(manifest, cache, FailingQuantize())
    quantized = list((cache / "objects" / "quantize").iterdir())
    assert quantized == []  # the staging directory is gone, no artifact without its marker
    report = build(manifest, cache)
    assert (report.built, report.reused) == (4, 2)  # the bake and convert of 'full' were kept
