"""plan / apply / smoke against real HTTP servers on loopback, each running the GGUFs with llama.cpp.

Every test starts its own Ollama-compatible test servers (tests/ollama_server.py) as separate
processes with separate stores. With OLLAMA_TEST_HOST set, the single-host tests run against that
real Ollama server instead, and the ones that need several hosts or fault injection are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess

import ollama
import pytest

from so8t_deploy.build import build
from so8t_deploy.manifest_loader import load_manifest

from .conftest import REPO
from .ollama_server import ServerPool

pytestmark = pytest.mark.llamacpp

REAL_HOST = os.environ.get("OLLAMA_TEST_HOST")
TAGS = ["so8t-demo:full-f16", "so8t-demo:full-q8_0", "so8t-demo:light-f16", "so8t-demo:light-q8_0"]


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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model and adapter, built once (two variants, f16 and q8_0) into a shared cache."""
    from so8t_deploy.demo import init_demo

    root = tmp_path_factory.mktemp("rollout")
    demo_dir = init_demo(root / "demo")
    cache = root / "cache"
    build(load_manifest(write_manifest(root / "build.yaml", demo_dir, [])), cache)
    return demo_dir, cache


def write_manifest(path, demo_dir, urls, *, system="You are a helpful assistant.", expect=".", prune=False,
                   on_failure="rollback", canary=1):
    targets = "\n".join(f"  - {{name: host-{i}, host: '{url}'}}" for i, url in enumerate(urls)) or "  []"
    path.write_text(f"""\
apiVersion: so8t-deploy/v1
name: so8t-demo
source:
  model: {demo_dir / 'model'}
  adapters: [{{kind: so8t, path: {demo_dir / 'adapters' / 'so8t'}}}]
bake:
  variants:
    full: {{}}
    light: {{rotation: 0.1, ffn: 0.05, triality: 0.02}}
quantize: [f16, q8_0]
modelfile:
  system: {json.dumps(system)}
  parameters: {{num_ctx: 512}}
targets:
{targets}
rollout:
  {{canary: {min(canary, max(len(urls), 1))}, parallelism: 2, on_failure: {on_failure}, prune: {str(prune).lower()}}}
smoke:
  - {{prompt: "Reply with the word hello.", expect: {json.dumps(expect)}, timeout_s: 60}}
""")
    return path


def apply(run_cli, manifest, cache):
    result = run_cli("apply", manifest, "--cache-dir", cache, "--json")
    return result, (json.loads(result.out) if result.out.strip().startswith("{") else None)


def test_make_deploy_end_to_end_then_a_noop_rerun(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    urls = hosts.start(2)
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, urls)
    proc = subprocess.run(["make", "-s", "deploy", f"MANIFEST={manifest}", f"CACHE_DIR={cache}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for url in urls:
        client = ollama.Client(host=url, timeout=120)
        assert {m.model for m in client.list().models} >= set(TAGS)
        for tag in TAGS:
            reply = client.generate(model=tag, prompt="Say hello.", options={"num_predict": 8})
            assert reply.response and reply.eval_count > 0
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


def test_plan_check_reports_drift_after_a_manifest_change(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    urls = hosts.start(1)
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, urls)
    result = run_cli("plan", manifest, "--cache-dir", cache, "--json")
    assert {a["kind"] for a in json.loads(result.out)[0]["actions"]} == {"upload", "create"}
    assert apply(run_cli, manifest, cache)[0].code == 0
    assert run_cli("plan", manifest, "--cache-dir", cache, "--check").code == 0

    changed = write_manifest(tmp_path / "m2.yaml", demo_dir, urls, system="You are terse.")
    result = run_cli("plan", changed, "--cache-dir", cache, "--check", "--json")
    assert result.code == 3
    actions = json.loads(result.out)[0]["actions"]
    assert {(a["kind"], a["tag"]) for a in actions} >= {("backup", "so8t-demo:full-q8_0"),
                                                         ("create", "so8t-demo:full-q8_0")}
    assert not [a for a in actions if a["kind"] == "upload"]  # same GGUFs: nothing to upload


def test_a_down_host_is_reported_and_the_others_continue(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    up = hosts.start(2)
    down_server = hosts.server(up[1])
    down_server.stop()
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, up)
    result, report = apply(run_cli, manifest, cache)
    assert result.code == 1
    statuses = {h["target"]: h["status"] for h in report["hosts"]}
    assert statuses == {"host-0": "ok", "host-1": "unreachable"}
    assert "host-1: unreachable" in result.err


def test_a_cut_upload_leaves_nothing_and_a_rerun_converges(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    server = hosts.server(url)
    server.faults(cut_upload_after_bytes=100_000, cut_upload_times=5)  # more cuts than the client's retries
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url])
    result, report = apply(run_cli, manifest, cache)
    assert result.code == 1 and report["hosts"][0]["status"] in ("failed", "unreachable")
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

    hosts.server(urls[0]).faults(generate_response="goodbye")
    second = write_manifest(tmp_path / "m2.yaml", demo_dir, urls, system="Version two.", expect="(?i)hello")
    result, report = apply(run_cli, second, cache)
    assert result.code == 1
    canary, other = report["hosts"]
    assert canary["status"] == "failed" and sorted(canary["rolled_back"]) == sorted(TAGS)
    assert other["status"] == "skipped"
    for tag in TAGS:  # the canary serves version one again
        assert ollama.Client(host=urls[0], timeout=30).show(tag).modelfile.count("Version one.") >= 1
    assert hosts.server(urls[1]).stats() == other_before  # the second host was never touched


def test_prune_deletes_only_the_manifests_own_namespace(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url], prune=True)
    assert apply(run_cli, manifest, cache)[0].code == 0
    client = ollama.Client(host=url, timeout=30)
    client.copy("so8t-demo:full-q8_0", "so8t-demo:retired")
    client.copy("so8t-demo:full-q8_0", "someone-else:latest")
    result, report = apply(run_cli, manifest, cache)
    assert result.code == 0, result.err
    assert report["hosts"][0]["deleted"] == ["so8t-demo:retired"]
    names = {m.model for m in client.list().models}
    assert "someone-else:latest" in names and set(TAGS) <= names and "so8t-demo:retired" not in names


def test_a_system_prompt_with_triple_quotes_arrives_intact(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    system = 'Answer in """fenced""" blocks and "quote" freely.'
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url], system=system)
    assert apply(run_cli, manifest, cache)[0].code == 0
    shown = ollama.Client(host=url, timeout=30)._client.post("/api/show", json={"model": TAGS[0]}).json()
    assert shown["system"] == system
    modelfile = (cache.parent / "releases" / "so8t-demo" / "full-f16" / "Modelfile").read_text()
    assert system in modelfile


def test_an_old_server_is_a_clear_error(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    hosts.server(url).faults(version="0.5.4")
    result, _ = apply(run_cli, write_manifest(tmp_path / "m.yaml", demo_dir, [url]), cache)
    assert result.code == 1
    assert "Ollama 0.5.4 is too old" in result.err and ">= 0.5.5" in result.err


def test_smoke_command_reports_every_tag(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url])
    assert apply(run_cli, manifest, cache)[0].code == 0
    result = run_cli("smoke", manifest, "--cache-dir", cache, "--json")
    assert result.code == 0, result.err
    results = json.loads(result.out)
    assert sorted(r["tag"] for r in results) == sorted(TAGS)
    assert all(r["passed"] and r["tokens_per_second"] > 0 for r in results)


def test_header_values_are_sent_but_never_printed(demo, hosts, tmp_path, run_cli):
    demo_dir, cache = demo
    [url] = hosts.start(1)
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, [url])
    text = manifest.read_text().replace(f"host: '{url}'}}", f"host: '{url}', headers: {{X-Api-Token: sekrit-123}}}}")
    manifest.write_text(text)
    hosts.server(url).faults(version="0.5.4")  # an error path: the message names the host, not the header
    for args in (("apply", manifest), ("plan", manifest, "--json"), ("-v", "apply", manifest)):
        result = run_cli(*args, "--cache-dir", cache)
        assert "sekrit-123" not in result.out + result.err
