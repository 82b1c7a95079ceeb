"""A ladder with an importance matrix, end to end on the demo model: computed once, cached, used by every level,
recorded in the GGUF as llama-quantize records it, and compared by `eval` with the same levels without it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from gguf import GGUFReader

from so8t_deploy.build.inputs import resolve_inputs
from so8t_deploy.build.pipeline import Pipeline
from so8t_deploy.build.plan import plan_builds
from so8t_deploy.build.runner import LocalRunner
from so8t_deploy.deploy.commands import build_manifest, eval_manifest
from so8t_deploy.external.imatrix import read_imatrix_info
from so8t_deploy.manifest.loader import load_manifest
from so8t_deploy.progress import SILENT
from so8t_deploy.quality.evaluate import cached_gate
from so8t_deploy.quality.report import write_report
from so8t_deploy.store.workspace import Workspace
from so8t_deploy.tiny_models import _corpus

pytestmark = pytest.mark.llamacpp

CHUNKS, CTX = 4, 64
MANIFEST = f"""\
apiVersion: so8t-deploy/v1
name: ladder
source:
  model: ./model
  adapters: [{{kind: so8t, path: ./adapters/so8t}}]
bake: {{variants: {{full: {{}}}}}}
quantize:
  types: [f16, q4_k_m, iq4_xs]
  imatrix: {{text: calibration.txt, chunks: {CHUNKS}, ctx: {CTX}}}
"""


class Lines:
    """A Progress that keeps its step lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, message: str) -> None:
        self.lines.append(message)

    def warning(self, message: str) -> None:
        self.lines.append(message)

    def transfer(self, label: str, total: int, *, unit: str = "bytes"):
        return None


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    from so8t_deploy.demo import init_demo

    root = tmp_path_factory.mktemp("imatrix-ladder")
    demo = init_demo(root / "demo")
    (demo / "calibration.txt").write_text("\n".join(_corpus(lines=400, seed=7)) + "\n", encoding="utf-8")
    (demo / "ladder.yaml").write_text(MANIFEST, encoding="utf-8")
    manifest = load_manifest(demo / "ladder.yaml")
    workspace, progress = Workspace(root / "cache"), Lines()
    report = build_manifest(manifest, workspace, progress)
    return demo, manifest, workspace, report, progress


def kv(path: Path) -> dict[str, object]:
    return {name: field.contents() for name, field in GGUFReader(path).fields.items()
            if name.startswith(("quantize.", "so8t."))}


def test_the_imatrix_is_computed_once_and_recorded_in_every_quantized_level(ladder):
    demo, manifest, workspace, report, progress = ladder
    matrices = list((workspace.objects / "imatrix").iterdir())
    assert len(matrices) == 1, matrices
    matrix = next(matrices[0].glob("*.imatrix.gguf"))
    info = read_imatrix_info(matrix)
    assert (info.chunks, info.chunk_size, info.datasets) == (CHUNKS, CTX, ("calibration.txt",))
    calibration = (demo / "calibration.txt").read_text(encoding="utf-8")
    assert (matrices[0] / "calibration.txt").read_text(encoding="utf-8") == calibration  # what it was computed on
    by_quant = {a.quant: a for a in report.artifacts}
    for quant in ("q4_k_m", "iq4_xs"):
        keys = kv(by_quant[quant].path)
        assert keys["quantize.imatrix.file"] == matrix.name  # a name, not this machine's path
        assert keys["quantize.imatrix.dataset"] == "calibration.txt"
        assert keys["quantize.imatrix.entries_count"] == info.entries
        assert keys["quantize.imatrix.chunks_count"] == CHUNKS
        assert keys["so8t.calibration"] == hashlib.sha256(calibration.encode()).hexdigest()
        assert keys["so8t.imatrix_key"] == matrices[0].name
    assert not any(k.startswith(("quantize.imatrix", "so8t.imatrix")) for k in kv(by_quant["f16"].path))
    lines = [line for line in progress.lines if "imatrix" in line and "chunk" in line]
    assert lines[0].endswith("left") and f"chunk 1/{CHUNKS}," in lines[0] and " s elapsed, about " in lines[0]
    assert f"chunk {CHUNKS}/{CHUNKS}," in lines[-1]

    again = Lines()
    rebuilt = build_manifest(manifest, workspace, again)
    # (The model's files may be hashed again: they were written moments before the first build. Their path
    # names this fixture's directory, "imatrix-ladder", so those lines are left out.)
    assert rebuilt.built == 0 and not any("imatrix" in line for line in again.lines if not line.startswith("hashing "))
    assert [a.sha256 for a in rebuilt.artifacts] == [a.sha256 for a in report.artifacts]


def test_eval_compares_each_level_with_the_same_level_without_the_imatrix(ladder, tmp_path):
    demo, manifest, workspace, report, _ = ladder
    results = {r.quant: r for r in eval_manifest(manifest, workspace)}
    inputs = resolve_inputs(manifest, workspace, SILENT, download_model=True)
    built = Pipeline(manifest, inputs, workspace, LocalRunner(workspace, SILENT), SILENT).build(
        plan_builds(manifest, inputs, workspace), baselines=True)
    assert built.built == 0  # eval built them already
    with_imatrix = {a.quant: a for a in built.artifacts}
    without = {a.quant: a for a in built.baselines}
    assert set(without) == {"q4_k_m", "iq4_xs"}
    for quant in ("q4_k_m", "iq4_xs"):
        r = results[quant]
        assert without[quant].sha256 != with_imatrix[quant].sha256  # the importance matrix changed the bytes
        assert r.imatrix and r.without_size == without[quant].size
        assert r.without_mean_kl is not None and r.without_mean_kl > 0 and r.mean_kl > 0
    assert results["f16"].without_mean_kl is None and not results["f16"].imatrix
    # the gate reads the imatrix ladder's numbers as it reads any ladder's
    gated = manifest.model_copy(update={"quality": manifest.quality.model_copy(
        update={"max_mean_kl": results["q4_k_m"].mean_kl * 1.001})})
    verdicts = cached_gate(gated, plan_builds(gated, inputs, workspace), workspace)
    assert verdicts["ladder:full-q4_k_m"] == [] and verdicts["ladder:full-f16"] == []
    assert verdicts["ladder:full-iq4_xs"] == [f"mean KL {results['iq4_xs'].mean_kl:.4f} > "
                                              f"{results['q4_k_m'].mean_kl * 1.001:g}"]
    paths = write_report(list(results.values()), tmp_path, manifest.name)
    assert "mean KL w/o imatrix" in paths[0].read_text() and paths[2].stat().st_size > 0
