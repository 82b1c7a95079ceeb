"""The GitOps loop on the DeployPlan: plan is pure, apply executes exactly the saved plan, one exit-code contract.

Hosts are Ollama test servers on loopback (tests/ollama_server/); the hub is the test hub (tests/hub_server.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import ollama
import pytest

from so8t_deploy.external.hub import CHAT_FILES

from .conftest import REPO
from .demo_manifests import DEMO_TAGS, write_demo_manifest
from .host_checks import requests_seen, tag_digests

pytestmark = pytest.mark.llamacpp

TAGS = DEMO_TAGS
manifest = write_demo_manifest


@pytest.fixture
def demo(built_demo):
    return built_demo


def actions(result) -> dict[str, set[tuple[str, str]]]:
    plan = json.loads(result.out)
    return {h["target"]: {(a["kind"], a["tag"]) for a in h["actions"]} for h in plan["hosts"]}


# --- acceptance 1: plan never downloads, never starts a container --------------------------------------------

def test_plan_of_a_hub_model_on_the_docker_backend_downloads_nothing(demo, pool, hub, hub_model, hf_env, tmp_path,
                                                                      run_cli, monkeypatch):
    import huggingface_hub

    import docker
    from so8t_deploy.external import llamacpp

    def forbidden(*args, **kwargs):
        raise AssertionError("plan must not download weights, start a container or extract the converter")

    snapshot_download = huggingface_hub.snapshot_download

    def chat_files_only(*args, allow_patterns, **kwargs):
        assert set(allow_patterns) <= set(CHAT_FILES), allow_patterns  # the chat template, nothing else
        return snapshot_download(*args, allow_patterns=allow_patterns, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", chat_files_only)
    monkeypatch.setattr(docker, "from_env", forbidden)
    monkeypatch.setattr(llamacpp, "_extract_converter", forbidden)
    demo_dir, _ = demo
    [url] = pool.start(1)
    docker_runtime = "runtime: {backend: docker, image: so8t-deploy-worker:never-used}\n"
    path = manifest(tmp_path / "m.yaml", demo_dir, [url], source=hub_model.repo_id, extra=docker_runtime)
    result = run_cli("plan", path, "--cache-dir", tmp_path / "cache", "--json")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["source"] == f"{hub_model.repo_id}@{hub_model.second}"  # main resolved to its commit
    assert all(len(step["key"]) == 64 for step in plan["builds"])  # keys from the hub's metadata alone
    assert actions(result) == {"host-0": {(k, t) for t in TAGS for k in ("upload", "create", "promote")}}
    fetched = hub.fetched()  # metadata and the chat template only, no weights
    assert "tokenizer_config.json" in fetched and set(fetched) <= set(CHAT_FILES), fetched
    asked = len(hub.requests())
    result = run_cli("plan", path, "--offline", "--cache-dir", tmp_path / "cache", "--json")
    assert result.code == 0 and len(hub.requests()) == asked  # --offline asks no hub (and no host)
    assert json.loads(result.out)["hosts"] == []
    assert all(step["key"] is None for step in json.loads(result.out)["builds"])

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the hub unreachable: keys unknown, the plan still made
    from so8t_deploy.external import hub as hub_module

    monkeypatch.setattr(hub_module, "_endpoint", lambda: "http://127.0.0.1:9")
    result = run_cli("plan", path, "--cache-dir", tmp_path / "cache", "--json")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert all(step["key"] is None and step["note"] == "key known after download" for step in plan["builds"])
    creates = [a for a in plan["hosts"][0]["actions"] if a["kind"] == "create"]
    assert len(creates) == 4 and all("key known after download" in a["detail"] for a in creates)


# --- acceptance 2: apply --plan executes exactly the saved plan -----------------------------------------------

def test_a_saved_plan_is_refused_when_a_host_changed_and_executed_when_not(demo, pool, tmp_path, run_cli):
    demo_dir, cache = demo
    urls = pool.start(2)
    v1 = manifest(tmp_path / "v1.yaml", demo_dir, urls, system="Version one.")
    assert run_cli("apply", v1, "--cache-dir", cache).code == 0
    v2 = manifest(tmp_path / "v2.yaml", demo_dir, urls, system="Version two.")
    saved = tmp_path / "plan.json"
    assert run_cli("plan", v2, "--cache-dir", cache, "--out", saved).code == 0

    ollama.Client(host=urls[1], timeout=30).copy(TAGS[0], TAGS[1])  # someone else changes a tag on host-1
    before = [tag_digests(u) for u in urls]
    result = run_cli("apply", v2, "--cache-dir", cache, "--plan", saved)
    assert result.code == 3, result.err
    assert "host-1" in result.err and "changed since the plan" in result.err
    assert [tag_digests(u) for u in urls][1] == before[1]  # nothing overwritten where it changed

    assert run_cli("plan", v2, "--cache-dir", cache, "--out", saved).code == 0
    result = run_cli("apply", v2, "--cache-dir", cache, "--plan", saved, "--json")
    assert result.code == 0, result.err
    assert run_cli("plan", v2, "--cache-dir", cache, "--check").code == 0

    v3 = manifest(tmp_path / "v3.yaml", demo_dir, urls, system="Version three.")
    assert run_cli("plan", v3, "--cache-dir", cache, "--out", saved).code == 0
    v3.write_text(v3.read_text().replace("Version three.", "Version four."))
    result = run_cli("apply", v3, "--cache-dir", cache, "--plan", saved)
    assert result.code == 3 and "changed since the plan was made" in result.err


# --- acceptance 3: plan --check and apply agree ------------------------------------------------------------

def test_plan_check_and_apply_agree(demo, pool, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = pool.start(1)
    path = manifest(tmp_path / "m.yaml", demo_dir, [url])
    assert run_cli("apply", path, "--cache-dir", cache).code == 0

    # unchanged: 0 and 0
    assert run_cli("plan", path, "--cache-dir", cache, "--check").code == 0
    assert run_cli("apply", path, "--cache-dir", cache).code == 0
    # an edit: 3, then apply 0, then 0
    edited = manifest(tmp_path / "m2.yaml", demo_dir, [url], system="Be brief.")
    assert run_cli("plan", edited, "--cache-dir", cache, "--check").code == 3
    assert run_cli("apply", edited, "--cache-dir", cache).code == 0
    assert run_cli("plan", edited, "--cache-dir", cache, "--check").code == 0
    # a failing quality gate: 3, and apply 1 (twice: the verdict is cached, the plan knows it)
    gated = manifest(tmp_path / "m3.yaml", demo_dir, [url], system="Gated.",
                     extra="quality: {windows: 2, context: 64, max_mean_kl: 0.0000001}\n")
    for _ in range(2):
        result = run_cli("plan", gated, "--cache-dir", cache, "--check", "--json")
        assert result.code == 3, result.err
        result = run_cli("apply", gated, "--cache-dir", cache, "--json")
        assert result.code == 1 and set(json.loads(result.out)["gated"]) == {t for t in TAGS if "q8_0" in t}
    held = actions(run_cli("plan", gated, "--cache-dir", cache, "--json"))["host-0"]
    assert {t for k, t in held if k == "held"} == {t for t in TAGS if "q8_0" in t}
    # a host down: 1 and 1
    pool.server(url).stop()
    assert run_cli("plan", path, "--cache-dir", cache, "--check").code == 1
    assert run_cli("apply", path, "--cache-dir", cache).code == 1


def test_plan_prints_a_pull_request_summary(demo, pool, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = pool.start(1)
    result = run_cli("plan", manifest(tmp_path / "m.yaml", demo_dir, [url]), "--cache-dir", cache,
                     "--format", "markdown")
    assert result.code == 0, result.err
    assert result.out.startswith("### so8t-deploy plan: `so8t-demo`")
    assert "**Changes** on 1 host; 0 of 6 build steps to run" in result.out
    assert "| host-0 | 8.7 MiB | 4 | 0 | 0 | 0 | 0 |" in result.out  # 4 GGUFs to upload, 4 creates
    assert "`host-0` **create** `so8t-demo:full-f16`" in result.out


# --- acceptance 4: two applies against one host -------------------------------------------------------------

def test_two_concurrent_applies_one_converges_the_other_stops_and_prev_keeps_the_last_good(demo, pool, tmp_path):
    demo_dir, cache = demo
    [url] = pool.start(1)
    cli = [sys.executable, "-m", "so8t_deploy", "apply", "--cache-dir", str(cache)]
    subprocess.run([*cli, str(manifest(tmp_path / "v1.yaml", demo_dir, [url], system="Version one."))],
                   cwd=REPO, check=True, capture_output=True)
    good = tag_digests(url)
    first = sorted(TAGS)[0]
    pool.server(url).faults(create_rules=[{"model": first, "action": "silence", "seconds": 6, "times": 1}])
    pool.server(url).clear_requests()
    a = subprocess.Popen([*cli, str(manifest(tmp_path / "v2.yaml", demo_dir, [url], system="Version two."))],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(r["path"] == "/api/create" for r in requests_seen(url)):
        assert time.monotonic() < deadline and a.poll() is None, "apply A never created"
        time.sleep(0.1)
    b = subprocess.Popen([*cli, str(manifest(tmp_path / "v3.yaml", demo_dir, [url], system="Version three."))],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, a_err = a.communicate(timeout=300)
    _, b_err = b.communicate(timeout=300)
    assert a.returncode == 0, a_err[-2000:]
    assert b.returncode == 3, b_err[-2000:]
    assert "changed since the plan was made" in b_err
    now = tag_digests(url)
    for tag in TAGS:
        assert now[tag + "-prev"] == good[tag]  # the backup still holds the last good model
        assert tag + "-rollback" not in now
    shown = ollama.Client(host=url, timeout=30).show(first)
    assert "Version two." in shown.modelfile
