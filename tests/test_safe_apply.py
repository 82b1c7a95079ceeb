"""Safe apply: a saved plan is checked input, live tags only ever serve smoke-tested models (blue/green per tag),
creates survive proxies, no rollout leaks a layer, and interrupts say what they leave.

Hosts are Ollama test servers on loopback (tests/ollama_server/), each a process with its own store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ollama
import pytest

from so8t_deploy.build.plan import BuildPlan, PlannedQuantize
from so8t_deploy.build.runner import LocalRunner
from so8t_deploy.build.steps import BakeStep, ConvertStep, QuantizeStep
from so8t_deploy.deploy import execute
from so8t_deploy.deploy import plan as deploy_plan
from so8t_deploy.store.workspace import Workspace, cache_key

from .conftest import REPO
from .demo_manifests import DEMO_TAGS, write_demo_manifest
from .host_checks import changes_seen, creates_by_model, requests_seen, tag_digests, unreferenced_blobs, wait_for
from .idle_proxy import IdleCuttingProxy

pytestmark = pytest.mark.llamacpp

TAGS = DEMO_TAGS
manifest = write_demo_manifest


def apply_process(path, cache, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "so8t_deploy", "apply", str(path), "--cache-dir", str(cache),
                             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def held_at_the_second_create(pool, url: str, demo_dir, cache, tmp_path) -> tuple[subprocess.Popen, object, str]:
    """Apply v1, then start applying v2 with the second tag's create kept silent: the process, once the first
    candidate is created and the second create is in flight; with v2's path and the first tag."""
    v1 = manifest(tmp_path / "v1.yaml", demo_dir, [url], system="One.")
    assert apply_process(v1, cache).wait(timeout=600) == 0
    first, second = sorted(TAGS)[:2]
    pool.server(url).faults(create_rules=[{"model": second + "-candidate", "action": "silence", "seconds": 60}])
    v2 = manifest(tmp_path / "v2.yaml", demo_dir, [url], system="Two.")
    proc = apply_process(v2, cache)
    wait_for(lambda: creates_by_model(url)[second] >= 2, what="the second create")
    return proc, v2, first


def companions_left(url: str) -> list[str]:
    return sorted(t for t in tag_digests(url) if t.endswith(("-candidate", "-rollback")))


# --- acceptance 1: a hand-edited plan is refused before any host changes ------------------------------------------

def plan_builds_again(*args, **kwargs):
    raise AssertionError("apply planned the builds again instead of running the saved plan's steps")


def _edit(plan: dict, case: str) -> dict:
    plan = json.loads(json.dumps(plan))
    host, tag = plan["hosts"][0], plan["tags"][0]
    if case == "delete a foreign tag":
        host["deletes"].append("victim:latest")
    elif case == "prune although the manifest does not":
        host["deletes"].append("so8t-demo:retired")
    elif case == "verify a foreign tag":
        host["decisions"][0] = {**host["decisions"][0], "tag": "victim:latest", "kind": "verify"}
    elif case == "tidy a foreign tag":
        host["tidy"].append("victim:latest")
    elif case == "a system prompt of its own":
        tag["system"] = "Ignore the manifest."
    elif case == "another Modelfile":
        tag["modelfile_digest"] = "0" * 64
    elif case == "a removed host":
        plan["hosts"].pop()
    elif case == "a removed tag":
        plan["tags"].pop(0)
    elif case == "another name":
        plan["name"] = "victim"
    elif case == "the previous format":
        plan["format"] = "so8t-deploy/plan-v2"
    elif case == "an edited build step":
        plan["builds"]["steps"][0]["scales"]["rotation"] = 0.5
    elif case == "an edited build step, keyed again":
        builds = plan["builds"]
        step = next(s for s in builds["steps"] if s["stage"] == "quantize")
        changed = {**step, "split_max_size": 1 << 30, "key": None}
        changed["key"] = cache_key(**PlannedQuantize.model_validate(changed).content())
        builds["steps"] = [changed if s is step else s for s in builds["steps"]]
        builds["tags"] = [{**t, "key": changed["key"]} if t["key"] == step["key"] else t for t in builds["tags"]]
    return plan


EDITS = {  # case: (exit code, what the line says)
    "delete a foreign tag": (2, "it would delete 'victim:latest', which is not a model of 'so8t-demo'"),
    "prune although the manifest does not": (2, "the manifest does not prune"),
    "verify a foreign tag": (2, "its decisions are not one per tag of the manifest"),
    "tidy a foreign tag": (2, "it would remove 'victim:latest'"),
    "a system prompt of its own": (2, "tags[0].system: unknown key"),
    "another Modelfile": (3, "the Modelfile of so8t-demo:full-f16"),
    "a removed host": (2, "its hosts differ from the manifest's targets (not in the manifest: -; missing: host-1)"),
    "a removed tag": (2, "missing: so8t-demo:full-f16"),
    "another name": (2, "a plan for 'victim', not for the manifest's 'so8t-demo'"),
    "the previous format": (2, "not a plan of this version (so8t-deploy/plan-v3)"),
    "an edited build step": (2, "the bake step of full: its key does not hash its content: the plan was edited"),
    "an edited build step, keyed again": (2, "the quantize step of full (q8_0): not the manifest's (split_max_size)"),
}


def test_a_hand_edited_plan_is_refused_before_any_host_changes(built_demo, pool, tmp_path, run_cli, monkeypatch):
    demo_dir, cache = built_demo
    urls = pool.start(2)
    v1 = manifest(tmp_path / "v1.yaml", demo_dir, urls, system="One.")
    assert run_cli("apply", v1, "--cache-dir", cache).code == 0
    ollama.Client(host=urls[0], timeout=30).copy(TAGS[0], "victim:latest")  # someone else's model
    v2 = manifest(tmp_path / "v2.yaml", demo_dir, urls, system="Two.")
    saved = tmp_path / "plan.json"
    assert run_cli("plan", v2, "--cache-dir", cache, "--out", saved).code == 0
    offline = tmp_path / "offline.json"
    assert run_cli("plan", v2, "--cache-dir", cache, "--offline", "--out", offline).code == 0
    original = json.loads(saved.read_text())
    monkeypatch.setattr(deploy_plan, "plan_builds", plan_builds_again)  # from here on, only saved steps
    monkeypatch.setattr(execute, "plan_builds", plan_builds_again)
    before = [tag_digests(u) for u in urls]
    for url in urls:
        pool.server(url).clear_requests()

    files = {}
    for case in EDITS:
        files[case] = tmp_path / f"{case.replace(' ', '-')}.json"
        files[case].write_text(json.dumps(_edit(original, case)))
    files["not UTF-8"] = tmp_path / "latin1.json"
    files["not UTF-8"].write_bytes(saved.read_bytes().replace(b'so8t-demo:full-f16"', b'so8t-demo:full-f16\xe9"', 1))
    files["a FIFO"] = tmp_path / "fifo.json"
    os.mkfifo(files["a FIFO"])  # nothing ever writes to it: reading it would hang
    expected = {**EDITS, "not UTF-8": (2, "cannot read plan: not UTF-8 text"),
                "a FIFO": (2, "cannot read plan: not a regular file (a FIFO)"),
                "made with --offline": (2, "made with --offline, so it observed no host")}
    files["made with --offline"] = offline
    for case, (code, says) in expected.items():
        result = run_cli("apply", v2, "--cache-dir", cache, "--plan", files[case])
        assert result.code == code, (case, result.err)
        assert says in last_line(result.err), (case, last_line(result.err))
        assert str(files[case]) in last_line(result.err) or code == 3, case
    assert run_cli("plan", v2, "--cache-dir", cache, "--out", tmp_path).code == 2  # --out onto a directory

    assert [tag_digests(u) for u in urls] == before  # names and digests, on every host
    assert [changes_seen(u) for u in urls] == [[], []]  # not one create, copy, delete or upload was sent
    result = run_cli("apply", v2, "--cache-dir", cache, "--plan", saved)  # the plan as saved still applies
    assert result.code == 0, result.err
    assert "victim:latest" in tag_digests(urls[0])


def test_apply_with_a_plan_runs_exactly_its_saved_build_steps(built_demo, pool, tmp_path, run_cli, monkeypatch):
    """The steps a reviewer saw are the steps that run, with the arguments they show; builds are not planned again."""
    demo_dir, built = built_demo
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)  # `full` is built; `fresh` is not
    urls = pool.start(1)
    path = manifest(tmp_path / "m.yaml", demo_dir, urls, variants="{full: {}, fresh: {rotation: 0.3, ffn: 0.2}}")
    saved = tmp_path / "plan.json"
    assert run_cli("plan", path, "--cache-dir", cache, "--out", saved).code == 0
    steps = BuildPlan.model_validate(json.loads(saved.read_text())["builds"]).steps
    to_run = [s for s in steps if not s.cached]
    assert [(s.stage, s.variant) for s in to_run] == [("bake", "fresh"), ("convert", "fresh"),
                                                      ("quantize", "fresh")]

    ran = []

    class Recording(LocalRunner):
        def run(self, step):
            ran.append(step)
            return super().run(step)

    monkeypatch.setattr(execute, "runner_for", lambda manifest, workspace, progress: Recording(workspace, progress))
    monkeypatch.setattr(deploy_plan, "plan_builds", plan_builds_again)
    monkeypatch.setattr(execute, "plan_builds", plan_builds_again)
    result = run_cli("apply", path, "--cache-dir", cache, "--plan", saved)
    assert result.code == 0, result.err

    bake, convert, quantize = to_run
    assert [type(s) for s in ran] == [BakeStep, ConvertStep, QuantizeStep]
    assert ran[0].scales.as_dict() == bake.scales and ran[0].dtype == bake.dtype
    assert (ran[1].outtype, ran[1].metadata, ran[1].split_max_size) == (convert.quant, convert.metadata, None)
    assert ran[1].metadata["so8t.bake_key"] == bake.key
    assert ran[2].quant == quantize.quant
    workspace = Workspace(cache)
    assert all(workspace.lookup(s.stage, s.key) for s in steps)  # each under the key the plan showed
    assert set(tag_digests(urls[0])) >= {"so8t-demo:fresh-f16", "so8t-demo:fresh-q8_0"}


# --- acceptance 3: a stale plan is refused on every host or none ---------------------------------------------------

def test_a_stale_plan_is_refused_on_all_hosts_when_the_third_changed(built_demo, pool, tmp_path, run_cli):
    demo_dir, cache = built_demo
    urls = pool.start(3)
    v1 = manifest(tmp_path / "v1.yaml", demo_dir, urls, system="One.", extra="")
    assert run_cli("apply", v1, "--cache-dir", cache).code == 0
    v2 = manifest(tmp_path / "v2.yaml", demo_dir, urls, system="Two.")
    saved = tmp_path / "plan.json"
    assert run_cli("plan", v2, "--cache-dir", cache, "--out", saved).code == 0
    ollama.Client(host=urls[2], timeout=30).copy(TAGS[1], TAGS[0])  # someone changes a tag on the third host
    before = [tag_digests(u) for u in urls]
    for url in urls:
        pool.server(url).clear_requests()
    result = run_cli("apply", v2, "--cache-dir", cache, "--plan", saved)
    assert result.code == 3, result.err
    assert "host-2 (so8t-demo:full-f16)" in last_line(result.err) and "nothing was changed" in last_line(result.err)
    assert [tag_digests(u) for u in urls] == before
    assert [changes_seen(u) for u in urls] == [[], [], []]  # the canary included


# --- acceptance 4: a run killed after a candidate was created -------------------------------------------------------

def test_a_killed_run_leaves_live_tags_tested_and_any_machine_finishes_it(built_demo, pool, tmp_path, run_cli):
    demo_dir, cache = built_demo
    [url] = pool.start(1)
    proc, v2, first = held_at_the_second_create(pool, url, demo_dir, cache, tmp_path)
    live = {t: d for t, d in tag_digests(url).items() if not t.endswith("-candidate")}
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    now = tag_digests(url)
    assert first + "-candidate" in now  # created, never smoke-tested ...
    assert {t: now[t] for t in live} == live  # ... and no live tag serves it
    pool.server(url).faults(reset=True)

    fresh = tmp_path / "fresh-runner-cache"  # a new CI runner: no journal, nothing built
    result = run_cli("plan", v2, "--cache-dir", fresh, "--check", "--json")
    assert result.code == 3, result.err
    actions = {(a["kind"], a["tag"]) for a in json.loads(result.out)["hosts"][0]["actions"]}
    assert ("unchanged", first) not in actions and ("create", first) in actions

    result = run_cli("apply", v2, "--cache-dir", cache, "--json")
    assert result.code == 0, result.err
    assert companions_left(url) == []
    assert run_cli("plan", v2, "--cache-dir", fresh, "--check").code == 0
    for tag in TAGS:
        assert "Two." in ollama.Client(host=url, timeout=30).show(tag).modelfile


# --- acceptance 5: rollouts leak no layer ---------------------------------------------------------------------------

def test_three_rollouts_that_change_the_weights_leave_no_former_model_layer_behind(built_demo, pool, tmp_path,
                                                                                   run_cli):
    demo_dir, cache = built_demo
    [url] = pool.start(1)
    store = pool.server(url).data_dir
    pool.server(url).faults(generate_response="hello")  # random weights may answer nothing: this is about layers
    for rotation in (0.1, 0.2, 0.3):  # each rollout bakes other weights
        variants = f"{{light: {{rotation: {rotation}}}}}"
        path = manifest(tmp_path / f"r{rotation}.yaml", demo_dir, [url], variants=variants)
        assert run_cli("apply", path, "--cache-dir", cache).code == 0
    uploads = {r["path"].removeprefix("/api/blobs/") for r in requests_seen(url)
               if r["method"] == "POST" and r["path"].startswith("/api/blobs/")}
    assert len(uploads) == 6  # two GGUFs per rollout
    # What Ollama cannot free until a restart is the uploaded source GGUF of each create (it rewrites it into a
    # new layer); every layer a former model used is gone.
    assert unreferenced_blobs(store) <= uploads
    now = tag_digests(url)
    assert sorted(now) == sorted([f"so8t-demo:light-{q}{s}" for q in ("f16", "q8_0") for s in ("", "-prev")])


# --- acceptance 6: a create behind a proxy that cuts idle connections ---------------------------------------------

def test_a_create_behind_a_proxy_that_cuts_idle_connections_lands_once(built_demo, pool, tmp_path, run_cli,
                                                                        monkeypatch):
    from so8t_deploy.rollout import host_apply

    monkeypatch.setattr(host_apply, "WAITING_LINE_EVERY_S", 1.0)
    demo_dir, cache = built_demo
    [url] = pool.start(1)
    server = pool.server(url)
    proxy = IdleCuttingProxy(int(url.rsplit(":", 1)[1]), idle_s=3.0)
    try:
        server.faults(create_rules=[{"model": "*", "action": "silence", "seconds": 6, "times": None}])
        path = manifest(tmp_path / "m.yaml", demo_dir, [proxy.url])
        result = run_cli("apply", path, "--cache-dir", cache, "--json")
        assert result.code == 0, result.err
        assert proxy.cuts >= len(TAGS)  # every create's connection was cut while the server was silent
    finally:
        proxy.close()
    assert creates_by_model(url) == {tag: 1 for tag in TAGS}  # once per tag, never re-sent
    assert all(body["stream"] is False for body in (r["body"] for r in requests_seen(url)
                                                     if r["path"] == "/api/create"))
    assert "the host is still working" in result.err
    assert sorted(json.loads(result.out)["hosts"][0]["promoted"]) == sorted(TAGS)
    assert companions_left(url) == []


def test_without_smoke_tests_a_candidate_must_still_load_before_it_goes_live(built_demo, pool, tmp_path, run_cli):
    demo_dir, cache = built_demo
    [url] = pool.start(1)
    server = pool.server(url)
    path = manifest(tmp_path / "m.yaml", demo_dir, [url], smoke_extra=None)
    server.faults(fail_generate=True)  # every model fails to load
    result = run_cli("apply", path, "--cache-dir", cache, "--json")
    assert result.code == 1
    assert {r["reason"].split(":")[0] for r in json.loads(result.out)["hosts"][0]["smoke"]} == {"load error"}
    assert tag_digests(url) == {}  # nothing went live
    server.faults(reset=True, generate_response="")  # an empty reply: not judged, the model loaded and ran
    assert run_cli("apply", path, "--cache-dir", cache).code == 0
    assert {r["body"]["options"]["num_predict"] for r in requests_seen(url) if r["path"] == "/api/generate"} == {1}


# --- exit codes: a down canary, Ctrl-C during smoke tests, a second Ctrl-C -------------------------------------------

@pytest.mark.parametrize(("policy", "other_status"), [("rollback", "skipped"), ("continue", "ok")])
def test_a_down_canary_follows_on_failure(built_demo, pool, tmp_path, run_cli, policy, other_status):
    demo_dir, cache = built_demo
    urls = pool.start(2)
    pool.server(urls[0]).stop()
    path = manifest(tmp_path / "m.yaml", demo_dir, urls, on_failure=policy)
    result = run_cli("apply", path, "--cache-dir", cache, "--json")
    assert result.code == 1
    canary, other = json.loads(result.out)["hosts"]
    assert canary["status"] == "unreachable" and other["status"] == other_status
    assert (tag_digests(urls[1]) == {}) == (policy == "rollback")


def test_ctrl_c_during_smoke_tests_stops_after_the_generation_in_flight(built_demo, pool, tmp_path):
    demo_dir, cache = built_demo
    [url] = pool.start(1)
    server = pool.server(url)
    v1 = manifest(tmp_path / "v1.yaml", demo_dir, [url], system="One.")
    assert apply_process(v1, cache).wait(timeout=600) == 0
    before = tag_digests(url)
    server.faults(generate_delay_s=3)
    server.clear_requests()
    proc = apply_process(manifest(tmp_path / "v2.yaml", demo_dir, [url], system="Two."), cache)
    wait_for(lambda: any(r["path"] == "/api/generate" for r in requests_seen(url)), what="the first smoke test")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "host-0: interrupted, as it was" in last_line(err)
    assert len([r for r in requests_seen(url) if r["path"] == "/api/generate"]) == 1
    assert tag_digests(url) == before


def test_a_second_ctrl_c_names_what_it_leaves_and_the_next_run_tidies_it(built_demo, pool, tmp_path, run_cli):
    demo_dir, cache = built_demo
    [url] = pool.start(1)
    proc, v2, first = held_at_the_second_create(pool, url, demo_dir, cache, tmp_path)
    before = {t: d for t, d in tag_digests(url).items() if not t.endswith("-candidate")}
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # again: stop at once, in the middle of the create
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    line = last_line(err)
    assert "stopped at once; left on the hosts: host-0:" in line and f"{first}-candidate" in line, line
    assert "nothing partial was kept" not in err
    assert {t: d for t, d in tag_digests(url).items() if t in before} == before  # live tags as they were
    pool.server(url).faults(reset=True)
    result = run_cli("apply", v2, "--cache-dir", cache)
    assert result.code == 0, result.err
    assert companions_left(url) == []
