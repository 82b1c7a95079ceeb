"""Registry mode end to end: a real registry (Debian's docker-registry), three Ollama test servers that pull from
it as Ollama does, and byte counters on every link from the controller.

Each host and the registry sit behind a CountingProxy, and the manifest names the proxies: what the controller
sends is what crosses those links towards them. The registry's proxy also carries the hosts' pull requests (a few
hundred bytes each), never the pulled bytes, which flow the other way.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import ollama
import pytest

from .demo_manifests import DEMO_TAGS, write_demo_manifest
from .host_checks import tag_digests
from .idle_proxy import CountingProxy

pytestmark = pytest.mark.llamacpp

O1_BYTES = 256 << 10  # what "O(1) per host" may cost: requests and small JSON bodies, never a GGUF
FULL_TAGS = [t for t in DEMO_TAGS if ":full-" in t]


def port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class Fleet:
    """A registry and hosts, each behind a byte-counting proxy."""

    def __init__(self, registry, pool, n: int):
        self.registry, self.pool = registry, pool
        self.urls = pool.start(n)
        self.host_proxies = [CountingProxy(port(url)) for url in self.urls]
        self.registry_proxy = CountingProxy(port(registry.url))

    def manifest(self, path: Path, demo_dir: Path, **options) -> Path:
        distribution = (f"distribution: {{registry: {{url: '{self.registry_proxy.url}', namespace: fleet, "
                        "insecure: true}}\n")
        return write_demo_manifest(path, demo_dir, [p.url for p in self.host_proxies],
                                   extra=distribution + options.pop("extra", ""), **options)

    def reset_counts(self) -> None:
        for proxy in (self.registry_proxy, *self.host_proxies):
            proxy.reset_counts()

    def stats(self) -> list[dict]:
        return [self.pool.server(url).stats() for url in self.urls]

    def close(self) -> None:
        for proxy in (self.registry_proxy, *self.host_proxies):
            proxy.close()


@pytest.fixture
def fleet(registry, pool):
    made: list[Fleet] = []

    def make(n: int) -> Fleet:
        made.append(Fleet(registry, pool, n))
        return made[-1]

    yield make
    for each in made:
        each.close()


def run_json(run_cli, *args):
    result = run_cli(*args, "--json")
    return result, (json.loads(result.out) if result.out.strip().startswith("{") else None)


def registry_manifest(registry, repository: str, digest: str) -> dict:
    answer = httpx.get(f"{registry.url}/v2/{repository}/manifests/{digest}",
                       headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}, timeout=30)
    return answer.raise_for_status().json()


def test_registry_mode_publishes_the_ladder_once_and_every_host_pulls_it(built_demo, fleet, registry, tmp_path,
                                                                         run_cli):
    demo_dir, cache = built_demo
    hosts = fleet(3)
    manifest = hosts.manifest(tmp_path / "m.yaml", demo_dir)
    _, plan = run_json(run_cli, "plan", manifest, "--cache-dir", cache)
    assert {a["kind"] for h in plan["hosts"] for a in h["actions"]} == {"pull", "promote"}  # no upload to a host
    ladder = plan["registry"]["publish"]
    assert sorted(ladder) == sorted(DEMO_TAGS) and all(size > 0 for size in ladder.values())
    hosts.reset_counts()

    result, report = run_json(run_cli, "apply", manifest, "--cache-dir", cache)
    assert result.code == 0, result.err
    assert all(h["status"] == "ok" and sorted(h["pulled"]) == sorted(DEMO_TAGS) for h in report["hosts"])
    digests = report["published"]["digests"]
    for url in hosts.urls:
        listed = tag_digests(url)  # /api/tags lists a manifest's digest in hex
        assert {tag: listed.get(tag) for tag in DEMO_TAGS} == {t: d.removeprefix("sha256:") for t, d in digests.items()}
        assert not [name for name in listed if "/" in name or name.endswith(("-candidate", "-rollback"))]
    stats = hosts.stats()
    assert all(s["bytes_received"] == 0 and s["blob_uploads"] == 0 for s in stats)  # nothing uploaded to a host
    assert all(s["bytes_pulled"] >= sum(ladder.values()) for s in stats)
    # Measured: the ladder crosses to the registry once; each host gets requests only.
    sent_to_registry = hosts.registry_proxy.sent
    assert sum(ladder.values()) <= sent_to_registry <= sum(ladder.values()) + O1_BYTES
    assert all(proxy.sent < O1_BYTES for proxy in hosts.host_proxies), [p.sent for p in hosts.host_proxies]

    # Provenance: a host's tag leads to its published manifest, and that to the build.
    tag = "so8t-demo:full-q8_0"
    published = registry_manifest(registry, "fleet/so8t-demo", digests[tag])
    annotations = published["annotations"]
    assert published["layers"][0]["digest"] == "sha256:" + annotations["dev.so8t.gguf.sha256"]
    assert annotations["dev.so8t.build.key"] and annotations["dev.so8t.bake.key"]

    hosts.reset_counts()
    before = hosts.stats()
    result, report = run_json(run_cli, "apply", manifest, "--cache-dir", cache)
    assert result.code == 0, result.err
    assert report["published"] is None  # no push
    assert all(h["pulled"] == [] and sorted(h["unchanged"]) == sorted(DEMO_TAGS) for h in report["hosts"])
    assert [s["pulls"] for s in hosts.stats()] == [s["pulls"] for s in before]  # no pull
    assert hosts.registry_proxy.sent < O1_BYTES and all(p.sent < O1_BYTES for p in hosts.host_proxies)
    assert run_cli("plan", manifest, "--cache-dir", cache, "--check").code == 0


@pytest.mark.parametrize("on_failure", ["rollback", "halt"])
def test_a_pull_cut_midway_rolls_that_host_back_and_the_others_follow_the_policy(built_demo, fleet, registry,
                                                                                  tmp_path, run_cli, on_failure):
    demo_dir, cache = built_demo
    hosts = fleet(3)
    first = hosts.manifest(tmp_path / "v1.yaml", demo_dir, variants="{full: {}}", parallelism=1)
    assert run_cli("apply", first, "--cache-dir", cache).code == 0
    # host-2 holds someone's model whose tag is one of ours in upper case: Ollama's pull of `...:light-f16` there
    # asks the registry for `...:LIGHT-F16` (it reuses a held spelling), so the image is published under both.
    ollama.Client(host=hosts.urls[2], timeout=30).copy("so8t-demo:full-f16", "keep/other:LIGHT-F16")
    before = [tag_digests(url) for url in hosts.urls]

    second = hosts.manifest(tmp_path / "v2.yaml", demo_dir, system="You are terse.", on_failure=on_failure,
                            parallelism=1)
    failing = hosts.pool.server(hosts.urls[1])
    failing.faults(fail_pull_after_bytes=4096, fail_pull_times=100, fail_pull_model="light-q8_0")
    result, report = run_json(run_cli, "apply", second, "--cache-dir", cache)
    assert result.code == 1
    by_host = {h["target"]: h for h in report["hosts"]}
    assert by_host["host-0"]["status"] == "ok"  # the canary
    broken = by_host["host-1"]
    assert broken["status"] == "failed" and "max retries exceeded" in broken["error"]
    assert len(broken["pulled"]) == 3  # three of its four pulls landed before the fourth broke off ...
    assert tag_digests(hosts.urls[1]) == before[1]  # ... and the host is exactly as it was, backups included
    if on_failure == "rollback":
        assert by_host["host-2"]["status"] == "ok", by_host["host-2"]
        held = tag_digests(hosts.urls[2])  # Ollama wrote so8t-demo:light-f16 as so8t-demo:LIGHT-F16 there
        assert sorted(tag.lower() for tag in held if tag.lower() in DEMO_TAGS) == sorted(DEMO_TAGS)
        assert held["keep/other:LIGHT-F16"] == before[2]["keep/other:LIGHT-F16"]
        digest = report["published"]["digests"]["so8t-demo:light-f16"]
        assert registry_manifest(registry, "fleet/so8t-demo", "LIGHT-F16") == \
            registry_manifest(registry, "fleet/so8t-demo", digest)
    else:
        assert by_host["host-2"]["status"] == "skipped"
        assert tag_digests(hosts.urls[2]) == before[2]

    failing.faults(reset=True)
    # A run killed between a pull and its copy leaves the pulled name; the next plan tidies it.
    leftover = f"{hosts.registry_proxy.url.removeprefix('http://')}/fleet/so8t-demo:full-f16"
    ollama.Client(host=hosts.urls[1], timeout=60).pull(leftover, insecure=True)
    _, plan = run_json(run_cli, "plan", second, "--cache-dir", cache)
    tidy = [a["tag"] for a in plan["hosts"][1]["actions"] if a["kind"] == "tidy"]
    assert tidy == [leftover]
    result, report = run_json(run_cli, "apply", second, "--cache-dir", cache)  # converges, resuming the partial
    assert result.code == 0, result.err
    assert {h["target"]: h["status"] for h in report["hosts"]} == {f"host-{i}": "ok" for i in range(3)}
    assert report["hosts"][1]["tidied"] == [leftover] and "/" not in "".join(tag_digests(hosts.urls[1]))
    assert run_cli("plan", second, "--cache-dir", cache, "--check").code == 0  # also where Ollama chose the spelling


def test_plan_says_in_one_line_when_hosts_could_not_pull_from_the_registry(built_demo, make_registry, pool, tmp_path,
                                                                           run_cli, instant_retries):
    demo_dir, cache = built_demo
    urls = pool.start(1)

    def manifest(name: str, url: str) -> Path:
        distribution = f"distribution: {{registry: {{url: '{url}', namespace: fleet, insecure: true}}}}\n"
        return write_demo_manifest(tmp_path / f"{name}.yaml", demo_dir, urls, extra=distribution)

    down = make_registry()
    down.stop()
    private = make_registry(auth=("deployer", "a-password-1"))
    for name, url, expected in [("down", down.url, "unreachable"),
                                ("private", private.url, "refuses anonymous reads")]:
        path = manifest(name, url)
        result = run_cli("plan", path, "--cache-dir", cache)
        assert result.code == 1
        last = result.err.strip().splitlines()[-1]
        assert last.startswith(f"{path}: plan: registry {url}") and expected in last, result.err
        result = run_cli("apply", path, "--cache-dir", cache)
        assert result.code == 1 and "nothing was changed" in result.err.strip().splitlines()[-1]
        assert not [t for t in tag_digests(urls[0]) if t in DEMO_TAGS]
    assert instant_retries  # the registry that is down was asked again, with a backoff (not waited out here)

    bare = make_registry(location_header=False)  # ollama#7244: apply publishes, then refuses before any host pulls
    path = manifest("bare", bare.url)
    result = run_cli("apply", path, "--cache-dir", cache)
    assert result.code == 1
    last = result.err.strip().splitlines()[-1]
    assert "no Location header" in last and "Location: [\"?\"]" in last, result.err
    assert tag_digests(urls[0]) == {} and pool.server(urls[0]).stats()["pulls"] == 0
