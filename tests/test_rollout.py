"""plan / apply / smoke against real HTTP servers on loopback, each running the GGUFs with llama.cpp.

Every test starts its own Ollama-compatible test servers (tests/ollama_server.py) as separate
processes with separate stores. With OLLAMA_TEST_HOST set, the single-host tests run against that
real Ollama server instead, and the ones that need several hosts or fault injection are skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import httpx
import ollama
import pytest

from .conftest import REPO
from .demo_manifests import DEMO_TAGS, write_demo_manifest
from .host_checks import creates_by_model, requests_seen, tag_digests, wait_for
from .ollama_server import ServerPool

pytestmark = pytest.mark.llamacpp

REAL_HOST = os.environ.get("OLLAMA_TEST_HOST")
TAGS = DEMO_TAGS
write_manifest = write_demo_manifest


class Hosts:
    def __init__(self, pool: ServerPool):
        self.pool = pool

    def start(self, n: int) -> list[str]:
        if REAL_HOST:
            if n > 1:
                pytest.skip(f"needs {n} independent hosts; OLLAMA_TEST_HOST names one")
            return [REAL_HOST.rstrip("/")]
        return self.pool.start(n)

    def server(self, url: str):
        if REAL_HOST:
            pytest.skip("fault injection needs the test server")
        return self.pool.server(url)


@pytest.fixture
def hosts(tmp_path):
    pool = ServerPool(tmp_path / "hosts")
    yield Hosts(pool)
    pool.stop_all()


@pytest.fixture
def demo(built_demo):
    return built_demo


def apply(run_cli, manifest, cache):
    result = run_cli("apply", manifest, "--cache-dir", cache, "--json")
    return result, (json.loads(result.out) if result.out.strip().startswith("{") else None)


def apply_in_subprocess(manifest, cache, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "so8t_deploy", "apply", str(manifest), "--cache-dir", str(cache)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def test_make_deploy_end_to_end_then_a_noop_rerun_then_drift(demo, hosts, tmp_path, run_cli):
    """`make deploy` to two hosts after a plan that says what it will do; a re-apply then changes nothing and
    plan --check agrees; an edit of the manifest is drift, which plan --check reports."""
    demo_dir, cache = demo
    urls = hosts.start(2)
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, urls)
    result = run_cli("plan", manifest, "--cache-dir", cache, "--json")
    for host in json.loads(result.out)["hosts"]:
        assert {a["kind"] for a in host["actions"]} == {"upload", "create", "promote"}
    proc = subprocess.run(["make", "-s", "deploy", f"MANIFEST={manifest}", f"CACHE_DIR={cache}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for url in urls:
        client = ollama.Client(host=url, timeout=120)
        assert {m.model for m in client.list().models} >= set(TAGS)
        for tag in TAGS:
            reply = client.generate(model=tag, prompt="Say hello.", options={"num_predict": 8, "seed": 1})
            assert reply.done and reply.eval_count > 0  # it ran (random weights may well say nothing)
        assert client.show("so8t-demo:full-q8_0").modelinfo["general.architecture"] == "phi3"

    before = [hosts.server(url).stats() for url in urls] if not REAL_HOST else None
    result, report = apply(run_cli, manifest, cache)
    assert result.code == 0, result.err
    for host in report["hosts"]:
        assert host["status"] == "ok"
        assert host["uploaded_bytes"] == 0 and host["created"] == [] and sorted(host["unchanged"]) == sorted(TAGS)
    if before is not None:
        after = [hosts.server(url).stats() for url in urls]
        for old, new in zip(before, after, strict=True):
            assert (new["bytes_received"], new["creates"]) == (old["bytes_received"], old["creates"])

    result = run_cli("plan", manifest, "--cache-dir", cache, "--check")
    assert result.code == 0, result.out + result.err

    changed = write_manifest(tmp_path / "m2.yaml", demo_dir, urls, system="You are terse.")
    result = run_cli("plan", changed, "--cache-dir", cache, "--check", "--json")
    assert result.code == 3
    for host in json.loads(result.out)["hosts"]:
        actions = host["actions"]
        assert {(a["kind"], a["tag"]) for a in actions} >= {("create", "so8t-demo:full-q8_0"),
                                                             ("promote", "so8t-demo:full-q8_0")}
        promote = next(a for a in actions if a["kind"] == "promote")
        assert "the live model becomes so8t-demo:full-f16-prev" in promote["detail"]
        assert not [a for a in actions if a["kind"] == "upload"]  # same GGUFs: nothing to upload


def test_a_down_host_is_reported_and_the_others_continue(demo, hosts, tmp_path, run_cli, instant_retries):
    demo_dir, cache = demo
    up = hosts.start(2)
    down_server = hosts.server(up[1])
    down_server.stop()
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, up)
    result, report = apply(run_cli, manifest, cache)
    assert result.code == 1
    statuses = {h["target"]: h["status"] for h in report["hosts"]}
    assert statuses == {"host-0": "ok", "host-1": "unreachable"}
    [line] = [line for line in result.err.splitlines() if line.startswith(f"{manifest}: ")]  # one line, last
    assert "host-1: unreachable" in line and line == result.err.strip().splitlines()[-1]

    result = run_cli("smoke", manifest, "--json")  # a host that is down is one row, not one per tag
    assert result.code == 1
    rows = [r for r in json.loads(result.out) if r["host"] == "host-1"]
    assert len(rows) == 1 and rows[0]["tag"] == "*" and "unreachable" in rows[0]["reason"]
    assert "ollama.com" not in result.out + result.err  # not the client's "download Ollama" text
    assert instant_retries  # the down host's calls were retried, with their backoff (not waited out here)


def test_a_cut_upload_leaves_nothing_and_a_rerun_converges(demo, hosts, tmp_path, run_cli, instant_retries):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    server = hosts.server(url)
    server.faults(cut_upload_after_bytes=100_000, cut_upload_times=5)  # more cuts than the client's retries
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url])
    result, report = apply(run_cli, manifest, cache)
    assert result.code == 1 and report["hosts"][0]["status"] in ("failed", "unreachable")
    assert instant_retries  # each cut upload was retried, with its backoff (not waited out here)
    client = ollama.Client(host=url, timeout=30)
    assert not [m for m in client.list().models if m.model in TAGS]
    server.faults(reset=True)
    result, report = apply(run_cli, manifest, cache)
    assert result.code == 0, result.err
    assert sorted(report["hosts"][0]["created"]) == sorted(TAGS)


def test_smoke_failure_on_the_canary_rolls_back_and_spares_the_others(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    urls = hosts.start(2)
    first = write_manifest(tmp_path / "m1.yaml", demo_dir, urls, system="Version one.")
    assert apply(run_cli, first, cache)[0].code == 0
    other_before = hosts.server(urls[1]).stats()

    before_canary = tag_digests(urls[0])
    hosts.server(urls[0]).faults(generate_response="goodbye")
    second = write_manifest(tmp_path / "m2.yaml", demo_dir, urls, system="Version two.", expect="(?i)hello")
    result, report = apply(run_cli, second, cache)
    assert result.code == 1
    canary, other = report["hosts"]
    # Blue/green: the candidates failed before any was promoted; the live tags were never touched.
    assert canary["status"] == "failed" and canary["rolled_back"] == [] and sorted(canary["created"]) == sorted(TAGS)
    assert canary["outcome"] == "as it was" and canary["unrestored"] == []
    assert {r["model"] for r in canary["smoke"]} == {t + "-candidate" for t in TAGS}
    assert other["status"] == "skipped"
    assert tag_digests(urls[0]) == before_canary
    for tag in TAGS:  # the canary serves version one again
        assert ollama.Client(host=urls[0], timeout=30).show(tag).modelfile.count("Version one.") >= 1
    assert hosts.server(urls[1]).stats() == other_before  # the second host was never touched


def test_one_apply_to_one_host_what_it_sends_and_what_the_host_serves(demo, hosts, tmp_path, run_cli, monkeypatch):
    """One apply to one host, then what it sent and what the host serves: one deterministic smoke request per tag
    that unloads the model; a system prompt with triple quotes intact; plan --check satisfied; the smoke command's
    report of every tag; the phi3 template's multi-turn prompt; prune in the manifest's own namespace only; the
    operator's OLLAMA_API_KEY in no request. Then the smoke options a manifest sets, on a second host."""
    demo_dir, cache = demo
    [url] = hosts.start(1)
    client = ollama.Client(host=url, timeout=120)  # this test's own: made before the key is set (it would send it)
    monkeypatch.setenv("OLLAMA_API_KEY", "sk-operator-secret")
    system = 'Answer in """fenced""" blocks and "quote" freely.'
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url], system=system, prune=True)
    assert apply(run_cli, manifest, cache)[0].code == 0

    # The smoke requests: deterministic, the manifest's num_ctx, and the model unloaded after each.
    generates = [r["body"] for r in requests_seen(url) if r["path"] == "/api/generate"]
    assert len(generates) == len(TAGS)
    for body in generates:
        assert body["options"]["seed"] == 42 and body["options"]["temperature"] == 0
        assert body["options"]["num_ctx"] == 512 and body["keep_alive"] == 0

    # A system prompt with triple quotes arrives intact.
    shown = httpx.post(f"{url}/api/show", json={"model": TAGS[0]}, timeout=30).raise_for_status().json()
    assert shown["system"] == system
    modelfile = (cache / "releases" / "so8t-demo" / "full-f16" / "Modelfile").read_text()
    assert system in modelfile

    assert run_cli("plan", manifest, "--cache-dir", cache, "--check").code == 0

    # The smoke command reports every tag: what each serves (the conversations), then the prompt.
    result = run_cli("smoke", manifest, "--json")
    assert result.code == 0, result.err
    results = json.loads(result.out)
    prompts = [r for r in results if r["kind"] == "prompt"]
    assert sorted(r["tag"] for r in prompts) == sorted(TAGS)
    assert all(r["passed"] and r["tokens_per_second"] > 0 for r in prompts)
    served = [r for r in results if r["kind"] == "conversation"]  # what each tag serves, checked first
    assert {r["tag"] for r in served} == set(TAGS) and all(r["passed"] for r in served)
    assert {r["prompt"] for r in served} == {"conversation: system and one user turn", "conversation: no system",
                                             "conversation: multi-turn with assistant turns",
                                             "conversation: multi-turn without a system message"}

    # The phi3 template: every turn ends `<|end|>\n`, so the chat runs on exactly the prompt the HF chat
    # template writes.
    turns = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Name a colour."}]
    expected = (f"<|system|>\n{system}<|end|>\n<|user|>\nHi there.<|end|>\n<|assistant|>\nHello.<|end|>\n"
                "<|user|>\nName a colour.<|end|>\n<|assistant|>\n")
    options = {"num_predict": 8, "seed": 1, "top_k": 1, "temperature": 0}
    chat = client.chat(model=TAGS[0], messages=turns, options=options)
    raw = client.generate(model=TAGS[0], prompt=expected, raw=True, options=options)
    assert chat.prompt_eval_count == raw.prompt_eval_count
    assert chat.message.content == raw.response

    # Prune deletes only what the manifest's own namespace has and the manifest does not.
    client.copy("so8t-demo:full-q8_0", "so8t-demo:retired")
    client.copy("so8t-demo:full-q8_0", "someone-else:latest")
    result, report = apply(run_cli, manifest, cache)
    assert result.code == 0, result.err
    assert report["hosts"][0]["deleted"] == ["so8t-demo:retired"]
    names = {m.model for m in client.list().models}
    assert "someone-else:latest" in names and set(TAGS) <= names and "so8t-demo:retired" not in names

    # Not one request of all these (apply twice, plan, smoke) carried the operator's key.
    seen = requests_seen(url)
    assert len(seen) > 10
    for request in seen:
        assert "authorization" not in request["headers"]
        assert "sk-operator-secret" not in json.dumps(request["headers"])

    # The smoke options a manifest sets are the ones sent.
    [url2] = hosts.start(1)
    manifest = write_manifest(tmp_path / "m2.yaml", demo_dir, [url2],
                              smoke_extra=", seed: 7, temperature: 0.5, keep_alive: 5m")
    assert apply(run_cli, manifest, cache)[0].code == 0
    for body in (r["body"] for r in requests_seen(url2) if r["path"] == "/api/generate"):
        assert (body["options"]["seed"], body["options"]["temperature"], body["keep_alive"]) == (7, 0.5, "5m")


def test_an_old_server_is_a_clear_error(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    hosts.server(url).faults(version="0.5.4")
    result, _ = apply(run_cli, write_manifest(tmp_path / "m.yaml", demo_dir, [url]), cache)
    assert result.code == 1
    assert "Ollama 0.5.4 is too old" in result.err and ">= 0.5.5" in result.err


def test_header_values_are_sent_but_never_printed(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url])
    text = manifest.read_text().replace(f"host: '{url}',", f"host: '{url}', headers: {{X-Api-Token: sekrit-123}},")
    manifest.write_text(text)
    hosts.server(url).faults(version="0.5.4")  # an error path: the message names the host, not the header
    for args in (("apply", manifest), ("plan", manifest, "--json"), ("-v", "apply", manifest)):
        result = run_cli(*args, "--cache-dir", cache)
        assert "sekrit-123" not in result.out + result.err


# --- current Ollama (0.30+): silent creates, in-stream failures, all or nothing per host ------------------

def test_a_create_silent_for_longer_than_any_read_timeout_is_sent_once(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    server = hosts.server(url)
    server.faults(create_rules=[{"model": "*", "action": "silence", "seconds": 3, "times": None}])
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url], host_timeout=1)  # every other call: 1 s
    result, report = apply(run_cli, manifest, cache)
    assert result.code == 0, result.err
    assert sorted(report["hosts"][0]["created"]) == sorted(TAGS)
    assert creates_by_model(url) == Counter(TAGS)  # exactly one create per tag, never a retry

    server.faults(reset=True)
    result, report = apply(run_cli, manifest, cache)  # the server rewrote every GGUF: still nothing to do
    assert result.code == 0 and report["hosts"][0]["uploaded_bytes"] == 0
    assert report["hosts"][0]["created"] == [] and creates_by_model(url) == Counter(TAGS)
    assert run_cli("plan", manifest, "--cache-dir", cache, "--check").code == 0


@pytest.mark.parametrize("action", ["fail_stream", "fail_http"])
def test_a_failed_second_create_leaves_a_non_canary_host_exactly_as_it_was(demo, hosts, tmp_path, run_cli, action):
    demo_dir, cache = demo
    urls = hosts.start(2)
    v1 = write_manifest(tmp_path / "v1.yaml", demo_dir, urls, system="Version one.")
    assert apply(run_cli, v1, cache)[0].code == 0
    before = tag_digests(urls[1])
    second = sorted(TAGS)[1]
    hosts.server(urls[1]).faults(create_rules=[{"model": second + "-candidate", "action": action,
                                                 "message": "injected failure", "times": 1}])
    result, report = apply(run_cli, write_manifest(tmp_path / "v2.yaml", demo_dir, urls, system="Version two."),
                           cache)
    assert result.code == 1
    canary, other = report["hosts"]
    assert canary["status"] == "ok" and canary["outcome"] == "converged"
    assert other["status"] == "failed" and "injected failure" in other["error"]
    assert other["outcome"] == "as it was" and other["unrestored"] == []
    assert tag_digests(urls[1]) == before  # names and digests: nothing added, nothing changed
    assert creates_by_model(urls[1])[second] == 2  # one per apply: the failed create was not re-sent
    assert "host-1: failed, as it was" in result.err

    # The next run converges the host that failed, and counts nothing it did not verify as unchanged.
    result, report = apply(run_cli, write_manifest(tmp_path / "v3.yaml", demo_dir, urls, system="Version two."),
                           cache)
    assert result.code == 0, result.err
    assert sorted(report["hosts"][1]["created"]) == sorted(TAGS) and report["hosts"][0]["created"] == []


def test_sigint_between_two_creates_rolls_the_host_back_and_exits_130(demo, hosts, tmp_path):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    subprocess.run([sys.executable, "-m", "so8t_deploy", "apply",
                    str(write_manifest(tmp_path / "v1.yaml", demo_dir, [url], system="Version one.")),
                    "--cache-dir", str(cache)], cwd=REPO, check=True, capture_output=True)
    before = tag_digests(url)
    second = sorted(TAGS)[1]
    hosts.server(url).faults(create_rules=[{"model": second + "-candidate", "action": "silence", "seconds": 4}])
    manifest = write_manifest(tmp_path / "v2.yaml", demo_dir, [url], system="Version two.")
    proc = apply_in_subprocess(manifest, cache)
    wait_for(lambda: creates_by_model(url)[second] >= 2, what="the second create of the second apply")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"{manifest}: apply: interrupted;")
    assert "host-0: interrupted, as it was" in err
    assert tag_digests(url) == before  # both candidates (the one in flight finished) are gone


def test_a_smoke_failure_says_why(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    server = hosts.server(url)
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url], expect="(?i)hello")
    server.faults(generate_response=" ")
    result, report = apply(run_cli, manifest, cache)
    prompts = [r for r in report["hosts"][0]["smoke"] if r["kind"] == "prompt"]
    assert result.code == 1 and {r["reason"] for r in prompts} == {"empty reply"}
    served = [r for r in report["hosts"][0]["smoke"] if r["kind"] == "conversation"]
    assert served and all(r["passed"] for r in served)  # what the host serves was checked first, and is right
    server.faults(reset=True, generate_response="goodbye")
    result, report = apply(run_cli, manifest, cache)
    assert all(r["reason"].startswith("no match:") for r in report["hosts"][0]["smoke"] if r["kind"] == "prompt")
    server.faults(reset=True, fail_generate=True)
    result, report = apply(run_cli, manifest, cache)
    assert all(r["reason"].startswith("load error:") for r in report["hosts"][0]["smoke"])
    assert tag_digests(url) == {}  # every failed run deleted the tags it had created


def test_a_host_that_renders_another_prompt_fails_the_smoke_test(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    hosts.server(url).faults(prompt_suffix=" ")  # say, an Ollama whose template engine renders otherwise
    result, report = apply(run_cli, write_manifest(tmp_path / "m.yaml", demo_dir, [url]), cache)
    assert result.code == 1
    failed = {r["reason"] for r in report["hosts"][0]["smoke"] if not r["passed"]}
    assert "host renders another prompt: conversation 'system and one user turn' differs at character 96: the " \
           "model's template renders the end, this one ' '" in failed
    assert {r["prompt"] for r in report["hosts"][0]["smoke"] if not r["passed"]} == {
        "conversation: system and one user turn", "conversation: no system",
        "conversation: multi-turn with assistant turns", "conversation: multi-turn without a system message"}
    assert tag_digests(url) == {}  # nothing went live


def test_a_host_that_cannot_render_without_generating_gets_a_warning(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    hosts.server(url).faults(ignore_debug_render=True)  # an Ollama older than _debug_render_only
    result, report = apply(run_cli, write_manifest(tmp_path / "m.yaml", demo_dir, [url]), cache)
    assert result.code == 0, result.err
    [warning] = [w for w in report["hosts"][0]["warnings"] if "_debug_render_only" in w]
    assert "host-0: conversation check of so8t-demo:full-f16, " in warning and warning in result.err
    served = [r for r in report["hosts"][0]["smoke"] if r["kind"] == "conversation"]
    assert {r["tag"] for r in served} == set(TAGS)
    assert all(r["passed"] and r["reason"].startswith("skipped: ") for r in served)


