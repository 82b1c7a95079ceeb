"""`build`: every tag's GGUF through the content-addressed cache; re-runs rebuild only what changed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from so8t_deploy.build.inputs import resolve_inputs
from so8t_deploy.build.pipeline import Pipeline
from so8t_deploy.build.plan import plan_builds
from so8t_deploy.build.runner import LocalRunner
from so8t_deploy.build.steps import QuantizeStep
from so8t_deploy.deploy.commands import build_manifest
from so8t_deploy.errors import BuildError
from so8t_deploy.external.gguf_info import read_gguf_info
from so8t_deploy.manifest.loader import load_manifest
from so8t_deploy.progress import SILENT
from so8t_deploy.store.hashing import sha256_file
from so8t_deploy.store.workspace import Workspace

from .conftest import REPO

pytestmark = pytest.mark.llamacpp


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
    assert max(map(len, result.out.splitlines())) <= 80  # piped output fits 80 columns, nothing cut
    assert all(f" {tag} " in result.out for tag in tags)
    assert "nothing to rebuild: all 4 steps are up to date" in result.out  # converts and quantizes: no bake needed
    assert "so8t-demo:light-q8_0" in result.out


def build(manifest, cache):
    return build_manifest(manifest, Workspace(cache))


def test_changing_one_variant_rebuilds_only_that_variant(demo, tmp_path):
    cache = tmp_path / "cache"
    first = build(load_manifest(write_manifest(demo, tmp_path / "a.yaml")), cache)
    changed = build(load_manifest(write_manifest(demo, tmp_path / "b.yaml", light="{rotation: 0.2}")), cache)
    assert (changed.built, changed.reused) == (3, 2)  # light: bake, convert, quantize; full: both reused
    by_tag = {a.tag: a for a in first.artifacts}
    for artifact in changed.artifacts:
        same = artifact.sha256 == by_tag[artifact.tag].sha256
        assert same == (artifact.variant == "full"), artifact.tag
    grown = build(load_manifest(write_manifest(demo, tmp_path / "c.yaml", light="{rotation: 0.2}",
                                               quantize="[f16, q8_0, q4_k_m]")), cache)
    assert (grown.built, grown.reused) == (2, 4)  # one new quant level per variant


class FailingQuantize(LocalRunner):
    def run(self, step):
        if isinstance(step, QuantizeStep):
            step.out_file.write_bytes(b"half a file")
            raise BuildError("quantizer died")
        return super().run(step)


def test_a_failed_step_leaves_nothing_trusted_and_a_rerun_converges(demo, tmp_path):
    manifest = load_manifest(write_manifest(demo, tmp_path / "m.yaml"))
    workspace = Workspace(tmp_path / "cache")
    inputs = resolve_inputs(manifest, workspace, SILENT, download_model=True)
    with pytest.raises(BuildError):
        Pipeline(manifest, inputs, workspace, FailingQuantize(workspace, SILENT), SILENT).build(
            plan_builds(manifest, inputs, workspace))
    quantized = list((workspace.objects / "quantize").iterdir())
    assert quantized == []  # the staging directory is gone, no artifact without its marker
    report = build(manifest, workspace.root)
    assert (report.built, report.reused) == (4, 1)  # the convert of 'full' was kept


def test_two_builds_on_one_workspace_both_succeed_with_the_same_bytes(demo, tmp_path):
    """Each artifact is produced once, under its key's lock; the other build waits and reuses it."""
    manifest = write_manifest(demo, tmp_path / "m.yaml")
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "so8t_deploy", "build", str(manifest), "--cache-dir", str(cache), "--json"]
    builds = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    results = [(b.wait(timeout=600), *b.communicate()) for b in builds]
    for code, _, err in results:
        assert code == 0, err[-2000:]
    reports = [json.loads(out) for _, out, _ in results]
    assert reports[0]["artifacts"] == reports[1]["artifacts"]  # the same files, the same sha256
    assert sum(r["built"] for r in reports) == 6  # every step ran exactly once, in one or the other
    for artifact in reports[0]["artifacts"]:
        assert sha256_file(Path(artifact["path"])) == artifact["sha256"]
    leftovers = [p for p in cache.rglob("*") if ".partial-" in p.name]
    assert leftovers == []
