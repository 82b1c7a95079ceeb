"""runtime.backend: docker against a real Docker engine and the worker image built from docker/Dockerfile.

CI builds the image first (`make image`: a debootstrapped Debian base, the host's wheelhouse, the
CPU torch pin). Without an engine or the image these tests skip, except under CI=true, where
that is a failure. SO8T_TEST_IMAGE names another image to test.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from so8t_deploy.build.steps import (
    BakeStep,
    ConvertStep,
    EvalStep,
    ImatrixStep,
    InspectStep,
    QuantizeStep,
    StepEnvelope,
)
from so8t_deploy.external.docker_engine import LLAMA_LABEL
from so8t_deploy.manifest.schema import AdapterRef, Scales

from .conftest import error_lines, require
from .control_venv import isolated_env, make_control_venv
from .ollama_server import ServerPool
from .test_architecture import ML_STACK

IMAGE = os.environ.get("SO8T_TEST_IMAGE", "so8t-deploy-worker:test")


def needs_docker(test):
    """The engine and the image, and llama.cpp on this side too (the tests build locally to compare)."""
    return pytest.mark.llamacpp(pytest.mark.docker(test))


def _engine():
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client
    except Exception:  # no engine, no socket, no permission: all mean "not here"
        return None


@pytest.fixture(scope="module")
def engine():
    client = _engine()
    require("a Docker engine", client is not None, "install docker.io and start dockerd, see .ci/run")
    import docker

    try:
        client.images.get(IMAGE)
        has_image = True
    except docker.errors.ImageNotFound:
        has_image = False
    require(f"the worker image {IMAGE}", has_image, "run `make image`")
    return client


def mounting(containers: list, root: Path) -> list:
    """The containers that mount something below root: other sessions may share the engine."""
    root = str(root.resolve())
    return [c for c in containers if any(m.get("Source", "").startswith(root) for m in c.attrs.get("Mounts", []))]


@pytest.fixture(autouse=True)
def no_leftover_containers(request, tmp_path_factory):
    yield
    client = _engine() if request.node.get_closest_marker("docker") else None
    if client is not None:
        left = mounting(client.containers.list(all=True, filters={"label": "so8t-deploy"}),
                        tmp_path_factory.getbasetemp())
        assert left == [], f"containers left behind: {[c.name for c in left]}"


@pytest.fixture(scope="module")
def demo(demo, tmp_path_factory):
    """conftest's demo, copied: with manifests for both backends beside it."""
    demo_dir = tmp_path_factory.mktemp("docker") / "demo"
    shutil.copytree(demo, demo_dir)
    # With an importance matrix: its step runs in the worker too, and must give the same bytes there.
    base = (demo_dir / "manifest.yaml").read_text().replace(
        "quantize: [f16, q8_0]", "quantize: {types: [f16, q8_0], imatrix: {text: calibration.txt, ctx: 64, chunks: 2}}")
    (demo_dir / "calibration.txt").write_text("the spinor of a rotation is the token of the vector\n" * 60)
    (demo_dir / "local.yaml").write_text(base)
    (demo_dir / "docker.yaml").write_text(base + f'runtime: {{backend: docker, image: "{IMAGE}"}}\n')
    (demo_dir / "gpu.yaml").write_text(base + f'runtime: {{backend: docker, image: "{IMAGE}", gpus: all}}\n')
    return demo_dir


def build(run_cli, manifest, cache):
    result = run_cli("build", manifest, "--cache-dir", cache, "--json")
    return result, (json.loads(result.out) if result.code == 0 else None)


def leftovers(cache: Path) -> list[Path]:
    """What a failed step may not leave behind: staging entries, step specs and results."""
    return [p for p in cache.rglob("*") if ".partial-" in p.name or p.is_relative_to(cache / "tmp") and p.is_file()]


def test_every_step_survives_the_spec_file_unchanged(tmp_path):
    """The contract between control plane and worker is one JSON file per step: nothing may be lost on the way."""
    adapter = AdapterRef(kind="so8t", path=tmp_path / "adapter")
    steps = [
        BakeStep(model_dir=tmp_path / "model", adapters=[adapter], out_dir=tmp_path / "out", dtype="bf16",
                 scales=Scales(rotation=0.5), digests_file=tmp_path / "digests.json", label="light"),
        ConvertStep(model_dir=tmp_path / "out", out_file=tmp_path / "m.gguf", outtype="f16", metadata={"so8t.x": "1"}),
        QuantizeStep(in_file=tmp_path / "m.gguf", out_file=tmp_path / "q.gguf", quant="q8_0"),
        ImatrixStep(gguf=tmp_path / "m.gguf", text_file=tmp_path / "c.txt", out_file=tmp_path / "i.gguf",
                    dataset="c.txt", ctx=64, chunks=None, parse_special=True),
        QuantizeStep(in_file=tmp_path / "m.gguf", out_file=tmp_path / "q.gguf", quant="iq4_xs",
                     imatrix=tmp_path / "i.gguf", metadata={"quantize.imatrix.entries_count": 7, "so8t.x": "1"},
                     split_max_size=10**9),
        InspectStep(path=tmp_path / "q.gguf"),
        EvalStep(reference=tmp_path / "m.gguf", candidates=[tmp_path / "q.gguf"], text="hello", windows=2, context=16),
    ]
    for step in steps:
        envelope = StepEnvelope(step=step, result_file=tmp_path / "result.json")
        assert StepEnvelope.model_validate_json(envelope.model_dump_json()) == envelope


@needs_docker
def test_docker_and_local_backends_produce_the_same_bytes(engine, demo, tmp_path, run_cli):
    local, local_report = build(run_cli, demo / "local.yaml", tmp_path / "local")
    assert local.code == 0, local.err
    docker, docker_report = build(run_cli, demo / "docker.yaml", tmp_path / "docker")
    assert docker.code == 0, docker.err
    shas = {a["tag"]: a["sha256"] for a in local_report["artifacts"]}
    assert {a["tag"]: a["sha256"] for a in docker_report["artifacts"]} == shas
    assert len(shas) == 4
    for artifact in docker_report["artifacts"]:  # written as the calling user, not root-owned
        assert os.stat(artifact["path"]).st_uid == os.getuid()
    assert leftovers(tmp_path / "docker") == []


@needs_docker
def test_a_container_killed_mid_bake_leaves_nothing_and_a_rerun_converges(engine, demo, tmp_path):
    cache = tmp_path / "cache"
    cli = [sys.executable, "-m", "so8t_deploy", "build", str(demo / "docker.yaml"), "--cache-dir", str(cache)]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()

    def kill_the_bake():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            for container in mounting(engine.containers.list(filters={"label": "so8t-deploy=bake"}), cache):
                container.kill()
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_bake)
    killer.start()
    out, err = proc.communicate(timeout=300)
    killer.join()
    assert killed.is_set(), "the bake container was never seen running"
    assert proc.returncode == 1, err
    assert error_lines(err, demo / "docker.yaml")[0].startswith("bake: worker container failed (killed)"), err
    bake_objects = cache / "objects" / "bake"
    assert not bake_objects.exists() or list(bake_objects.iterdir()) == []
    assert leftovers(cache) == []
    rerun = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr


@needs_docker
def test_a_failing_step_reports_the_workers_own_error(engine, demo, tmp_path, run_cli):
    broken = tmp_path / "demo"  # the demo with its weights cut short: the bake in the container refuses them
    subprocess.run(["cp", "-r", str(demo), str(broken)], check=True)
    weights = next((broken / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:4096])
    result, _ = build(run_cli, broken / "docker.yaml", tmp_path / "cache")
    assert result.code == 1
    [line] = error_lines(result.err, broken / "docker.yaml")
    assert line.startswith("bake: worker container failed (exit 2): "), line
    assert str(weights.parent) in line, line  # the worker's own message, naming the model
    assert leftovers(tmp_path / "cache") == []


@needs_docker
def test_a_gpu_request_without_a_gpu_runtime_is_a_clear_error(engine, demo, tmp_path, run_cli):
    result, _ = build(run_cli, demo / "gpu.yaml", tmp_path / "cache")
    assert result.code == 1
    assert error_lines(result.err, demo / "gpu.yaml") == [
        "runtime.gpus: 'all', but the Docker engine has no GPU runtime "
        "(install the NVIDIA container toolkit, or set gpus: none)"]


@needs_docker
def test_a_missing_image_is_a_clear_error(engine, demo, tmp_path, run_cli):
    manifest = demo / "missing-image.yaml"  # beside the demo: its paths are relative
    manifest.write_text((demo / "docker.yaml").read_text().replace(IMAGE, "so8t-no-such-image:1"))
    result, _ = build(run_cli, manifest, tmp_path / "cache")
    assert result.code == 1
    assert error_lines(result.err, manifest) == [
        "runtime.image: so8t-no-such-image:1 not found; build it with `so8t-deploy image build`"]


@needs_docker
def test_an_image_with_another_llama_cpp_is_refused(engine, demo, tmp_path, run_cli):
    from so8t_deploy.external.llamacpp import LLAMA_CPP_PYTHON_VERSION

    tag = f"so8t-test-other-llama:{os.getpid()}"  # the image under test with only its label changed
    dockerfile = f'FROM {IMAGE}\nLABEL {LLAMA_LABEL}="0.0.1"\n'.encode()
    engine.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True, pull=False, network_mode="none")
    try:
        manifest = demo / "other-llama.yaml"
        manifest.write_text((demo / "docker.yaml").read_text().replace(IMAGE, tag))
        result, _ = build(run_cli, manifest, tmp_path / "cache")
    finally:
        engine.images.remove(tag, force=True)
    assert result.code == 1
    assert error_lines(result.err, manifest) == [
        f"runtime.image: {tag} carries llama-cpp-python 0.0.1, but this so8t-deploy "
        f"is pinned to {LLAMA_CPP_PYTHON_VERSION}; rebuild it with `so8t-deploy image build`"]
    assert not (tmp_path / "cache" / "objects" / "bake").exists() or \
        list((tmp_path / "cache" / "objects" / "bake").iterdir()) == []


# -- the control plane on a machine without torch ----------------------------------------------------------


@pytest.fixture(scope="module")
def control_bin(tmp_path_factory):
    return make_control_venv(tmp_path_factory.mktemp("control"))


def _so8t(bin_dir: Path, *args, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "so8t-deploy"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.mark.slow
@needs_docker
def test_the_control_plane_drives_the_docker_backend_from_a_venv_without_torch(engine, demo, control_bin,
                                                                                 tmp_path):
    python = control_bin / "python"
    probe = ("import importlib.util, so8t_deploy; "
             f"print(so8t_deploy.__file__); print([m for m in {sorted(ML_STACK)!r} if importlib.util.find_spec(m)])")
    where, found = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True,
                                  env=isolated_env(), cwd=tmp_path).stdout.splitlines()
    assert Path(where).is_relative_to(control_bin.parent), where  # the installed wheel, not this checkout
    assert found == "[]", found
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=isolated_env())
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    manifest = demo / "control.yaml"  # a lenient quality gate: apply evaluates too, in the container
    manifest.write_text((demo / "docker.yaml").read_text() + "quality: {windows: 2, context: 64, max_mean_kl: 1.0}\n")
    cache = tmp_path / "cache"
    pool = ServerPool(tmp_path / "hosts")
    try:
        [url] = pool.start(1)
        env = isolated_env(OLLAMA_HOST=url)

        validate = _so8t(control_bin, "validate", manifest, env=env, cwd=tmp_path)
        assert validate.returncode == 0, validate.stderr
        assert "note: the ML stack (torch) is not installed here" in validate.stderr

        plan = _so8t(control_bin, "plan", manifest, "--cache-dir", cache, "--json", env=env, cwd=tmp_path)
        assert plan.returncode == 0, plan.stderr
        planned = json.loads(plan.stdout)
        # bake, convert, imatrix and quantize of each variant: the importance matrix is computed in the container
        assert [s["stage"] for s in planned["builds"]] == ["bake", "convert", "imatrix", "quantize"] * 2
        assert [s["cached"] for s in planned["builds"]] == [False] * 8
        assert sorted(a["kind"] for a in planned["hosts"][0]["actions"]) == ["create"] * 4 + ["promote"] * 4 + [
            "upload"] * 4

        apply = _so8t(control_bin, "apply", manifest, "--cache-dir", cache, "--json", env=env, cwd=tmp_path)
        assert apply.returncode == 0, apply.stderr
        applied = json.loads(apply.stdout)
        assert applied["build"] == {"built": 8, "reused": 0} and applied["gated"] == {}
        [host] = applied["hosts"]
        assert host["status"] == "ok" and len(host["created"]) == 4, host
        assert len(list((cache / "objects" / "eval").iterdir())) == 4  # the gate's numbers, from an EvalStep

        smoke = _so8t(control_bin, "smoke", manifest, "--json", env=env, cwd=tmp_path)
        assert smoke.returncode == 0, smoke.stderr
        results = json.loads(smoke.stdout)
        assert [r["passed"] for r in results if r["kind"] == "prompt"] == [True] * 4
        assert len([r for r in results if r["kind"] == "conversation" and r["passed"]]) == 4 * 4  # 4 per tag

        check = _so8t(control_bin, "plan", manifest, "--cache-dir", cache, "--check", env=env, cwd=tmp_path)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        pool.stop_all()
