"""runtime.backend: docker against a real Docker engine and the worker image built from docker/Dockerfile.

CI builds the image first (`make image`: a debootstrapped Debian base, the host's wheelhouse, the
CPU torch pin). Without an engine or the image these tests skip, except under CI=true, where
that is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from .conftest import require

pytestmark = [pytest.mark.docker, pytest.mark.llamacpp]

IMAGE = os.environ.get("SO8T_TEST_IMAGE", "so8t-deploy-worker:test")


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


@pytest.fixture(autouse=True)
def no_leftover_containers(request):
    yield
    client = _engine() if request.node.get_closest_marker("docker") else None
    if client is not None:
        left = client.containers.list(all=True, filters={"label": "so8t-deploy"})
        assert left == [], f"containers left behind: {[c.name for c in left]}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from so8t_deploy.demo import init_demo

    root = tmp_path_factory.mktemp("docker")
    demo_dir = init_demo(root / "demo")
    base = (demo_dir / "manifest.yaml").read_text()
    (demo_dir / "local.yaml").write_text(base)
    (demo_dir / "docker.yaml").write_text(base + f'runtime: {{backend: docker, image: "{IMAGE}"}}\n')
    (demo_dir / "gpu.yaml").write_text(base + f'runtime: {{backend: docker, image: "{IMAGE}", gpus: all}}\n')
    return demo_dir


def build(run_cli, manifest, cache):
    result = run_cli("build", manifest, "--cache-dir", cache, "--json")
    return result, (json.loads(result.out) if result.code == 0 else None)


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


def test_a_container_killed_mid_bake_leaves_nothing_and_a_rerun_converges(engine, demo, tmp_path):
    cache = tmp_path / "cache"
    cli = [sys.executable, "-m", "so8t_deploy", "build", str(demo / "docker.yaml"), "--cache-dir", str(cache)]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()

    def kill_the_bake():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            for container in engine.containers.list(filters={"label": "so8t-deploy=bake"}):
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
    assert "bake: worker container failed (killed)" in err
    bake_objects = cache / "objects" / "bake"
    assert not bake_objects.exists() or [p for p in bake_objects.iterdir()] == []
    rerun = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr


def test_a_gpu_request_without_a_gpu_runtime_is_a_clear_error(engine, demo, tmp_path, run_cli):
    result, _ = build(run_cli, demo / "gpu.yaml", tmp_path / "cache")
    assert result.code == 1
    assert "runtime.gpus: 'all', but the Docker engine has no GPU runtime" in result.err
    assert "gpus: none" in result.err and len(result.err.strip().splitlines()) == 1


def test_a_missing_image_is_a_clear_error(engine, demo, tmp_path, run_cli):
    manifest = demo / "missing-image.yaml"  # beside the demo: its paths are relative
    manifest.write_text((demo / "docker.yaml").read_text().replace(IMAGE, "so8t-no-such-image:1"))
    result, _ = build(run_cli, manifest, tmp_path / "cache")
    assert result.code == 1 and "so8t-no-such-image:1 not found" in result.err
