"""The hub path: `plan`, `apply` and `build` of a manifest whose source.model is a hub repo id, against the test hub
(tests/hub_server.py) and Ollama test servers, through the real huggingface_hub client.

What issue 13 asks of it: a pinned revision builds exactly that commit and never drifts, a moving branch shows as drift
in `plan --check`; only the files a bake reads are fetched; a cut download resumes (within a run and across runs); a
gated repo without a token and an unreachable hub give one line naming the manifest, the field and the next step; and
the hub cache lives under --cache-dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import ollama
import pytest

from tests.hub_fixtures import HF_UNSET, PublishedModel

from .conftest import REPO

pytestmark = pytest.mark.llamacpp

NAME = "hub-tiny"
TAG = f"{NAME}:f16"
WEIGHTS = "model.safetensors"


def hub_manifest(path: Path, repo_id: str, urls: Sequence[str] = (), *, revision: str | None = None,
                 system: str | None = None) -> Path:
    """One variant, one quant level, no adapter: the smallest manifest that bakes, converts and deploys a hub model."""
    system_line = f"\n  system: {json.dumps(system)}" if system else ""
    targets = "\n".join(f"  - {{name: host-{i}, host: '{url}', timeout_s: 30}}" for i, url in enumerate(urls))
    path.write_text(f"""\
apiVersion: so8t-deploy/v1
name: {NAME}
source:
  model: {repo_id}
  revision: {json.dumps(revision)}
  adapters: []
quantize: [f16]
modelfile:
  parameters: {{num_ctx: 256}}{system_line}
targets:
{targets or '  []'}
rollout: {{canary: 1, parallelism: 1, on_failure: rollback, prune: false}}
smoke:
  - {{prompt: "Say hello.", expect: ".", timeout_s: 60}}
""")
    return path


def bake_files(model: PublishedModel, revision: str) -> set[str]:
    """What a bake reads at `revision`: the safetensors, the JSON files and the SentencePiece model."""
    return {p for p in model.repo.files(revision) if p.endswith((".safetensors", ".json")) or p == "tokenizer.model"}


def assert_only_bake_files_fetched(hub, model: PublishedModel, revision: str) -> None:
    fetched = set(hub.fetched())
    assert fetched <= bake_files(model, revision), fetched - bake_files(model, revision)
    assert not fetched & {*model.decoys, "README.md", ".gitattributes"}


def snapshot(cache: Path, model: PublishedModel, commit: str) -> Path:
    return cache / "hub" / f"models--{model.repo_id.replace('/', '--')}" / "snapshots" / commit


def retrained(model: PublishedModel) -> str:
    """Commit other weights on main (not `changed_safetensors` again: that flips the same bit back to `first`)."""
    data = bytearray(model.repo.read(WEIGHTS))
    start = 8 + int.from_bytes(data[:8], "little")
    data[start] ^= 2  # a low mantissa bit of the first value: still finite
    return model.repo.commit({WEIGHTS: bytes(data)}, message="Retrain")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def built_sources(run_cli, manifest: Path, cache: Path) -> set[str]:
    """`so8t.source_model` of every GGUF the manifest builds (already built: `build` reuses them)."""
    from so8t_deploy.external.gguf_info import read_gguf_info

    result = run_cli("build", manifest, "--cache-dir", cache, "--json")
    assert result.code == 0, result.err
    return {read_gguf_info(Path(a["path"])).metadata["so8t.source_model"] for a in json.loads(result.out)["artifacts"]}


def error_line(result) -> str:
    """The one line the CLI prints for an error: the last on stderr (step lines come before it)."""
    return result.err.strip().splitlines()[-1]


def weight_gets(hub) -> list[dict]:
    return hub.requests(method="GET", file=WEIGHTS)


# --- revisions: a pinned commit or tag never moves, a branch does ---------------------------------------------------

def test_a_pinned_commit_builds_exactly_that_commit_and_never_drifts(pool, hub, hub_model, hf_env, tmp_path, run_cli):
    [url] = pool.start(1)
    cache = tmp_path / "cache"
    pinned = hub_manifest(tmp_path / "pinned.yaml", hub_model.repo_id, [url], revision=hub_model.first)
    result = run_cli("apply", pinned, "--cache-dir", cache)
    assert result.code == 0, result.err

    assert_only_bake_files_fetched(hub, hub_model, hub_model.first)
    assert set(hub.fetched()) == bake_files(hub_model, hub_model.first)
    local = snapshot(cache, hub_model, hub_model.first)
    for path in bake_files(hub_model, hub_model.first):
        assert sha256_file(local / path) == hub_model.sha256(path, hub_model.first), path
    assert hub_model.sha256(WEIGHTS, hub_model.first) != hub_model.sha256(WEIGHTS)  # main holds other weights
    assert built_sources(run_cli, pinned, cache) == {f"{hub_model.repo_id}@{hub_model.first}"}

    retrained(hub_model)  # main moves on
    hub.reset()
    assert run_cli("plan", pinned, "--cache-dir", cache, "--check").code == 0
    tagged = hub_manifest(tmp_path / "tagged.yaml", hub_model.repo_id, [url], revision=hub_model.tag)
    result = run_cli("plan", tagged, "--cache-dir", cache, "--check", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["source"] == f"{hub_model.repo_id}@{hub_model.first}"
    on_main = hub_manifest(tmp_path / "main.yaml", hub_model.repo_id, [url])
    assert run_cli("plan", on_main, "--cache-dir", cache, "--check").code == 3
    assert hub.fetched() == []  # plans read metadata only


def test_a_moving_branch_shows_as_drift_and_apply_converges(pool, hub, hub_model, hf_env, tmp_path, run_cli):
    [url] = pool.start(1)
    cache = tmp_path / "cache"
    manifest = hub_manifest(tmp_path / "m.yaml", hub_model.repo_id, [url])
    assert run_cli("apply", manifest, "--cache-dir", cache).code == 0
    assert built_sources(run_cli, manifest, cache) == {f"{hub_model.repo_id}@{hub_model.second}"}
    assert run_cli("plan", manifest, "--cache-dir", cache, "--check").code == 0

    third = retrained(hub_model)
    hub.reset()
    saved = tmp_path / "plan.json"
    result = run_cli("plan", manifest, "--cache-dir", cache, "--check", "--json", "--out", saved)
    assert result.code == 3, result.err
    plan = json.loads(result.out)
    assert plan["source"] == f"{hub_model.repo_id}@{third}"
    assert {(a["kind"], a["tag"]) for a in plan["hosts"][0]["actions"]} >= {("create", TAG)}
    assert hub.fetched() == []

    # main moves again before the reviewed plan is applied: apply --plan builds what the plan showed.
    fourth = retrained(hub_model)
    result = run_cli("apply", manifest, "--cache-dir", cache, "--plan", saved)
    assert result.code == 0, result.err
    assert hub.fetched() == [WEIGHTS]  # the new commit changed the weights only: the rest is in the cache
    at_third = hub_manifest(tmp_path / "third.yaml", hub_model.repo_id, [url], revision=third)
    assert built_sources(run_cli, at_third, cache) == {f"{hub_model.repo_id}@{third}"}
    assert run_cli("plan", at_third, "--cache-dir", cache, "--check").code == 0

    assert run_cli("plan", manifest, "--cache-dir", cache, "--check").code == 3
    assert run_cli("apply", manifest, "--cache-dir", cache).code == 0
    assert built_sources(run_cli, manifest, cache) == {f"{hub_model.repo_id}@{fourth}"}
    assert run_cli("plan", manifest, "--cache-dir", cache, "--check").code == 0
    assert_only_bake_files_fetched(hub, hub_model, fourth)


# --- an interrupted download resumes ----------------------------------------------------------------------------

@pytest.mark.parametrize("cut_mode", ["reset", "close"])
def test_a_download_cut_mid_file_resumes_with_a_range(hub, hub_model, hf_env, tmp_path, run_cli, cut_mode):
    size = len(hub_model.repo.read(WEIGHTS))
    cut = size // 2
    hub.faults(cut_file=WEIGHTS, cut_after_bytes=cut, cut_mode=cut_mode)
    manifest = hub_manifest(tmp_path / "m.yaml", hub_model.repo_id)
    result = run_cli("build", manifest, "--cache-dir", tmp_path / "cache")
    assert result.code == 0, result.err

    first, second = weight_gets(hub)
    assert (first["cut"], first["range"], first["bytes"]) == (cut_mode, None, cut)
    resumed_at = int(second["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= cut and second["status"] == 206 and second["bytes"] == size - resumed_at
    assert first["bytes"] + second["bytes"] < 2 * size
    local = snapshot(tmp_path / "cache", hub_model, hub_model.second) / WEIGHTS
    assert sha256_file(local) == hub_model.sha256(WEIGHTS)
    assert_only_bake_files_fetched(hub, hub_model, hub_model.second)


def test_a_run_that_gives_up_keeps_what_arrived_and_the_next_run_resumes(hub, hub_model, hf_env, tmp_path, run_cli,
                                                                         instant_retries):
    from so8t_deploy.external.hub import ATTEMPTS_WITHOUT_PROGRESS, PARTIAL_DIR, RETRY_PAUSE_S

    size, cache = len(hub_model.repo.read(WEIGHTS)), tmp_path / "cache"
    cut = size // 3
    # Every GET is cut at the same place in the file: the first gets there, the ones that resume add nothing.
    hub.faults(cut_file=WEIGHTS, cut_after_bytes=cut, cut_mode="reset", cut_counted_from="file", cut_times=100)
    manifest = hub_manifest(tmp_path / "m.yaml", hub_model.repo_id)
    result = run_cli("build", manifest, "--cache-dir", cache)
    assert result.code == 1
    line = error_line(result)
    assert line.startswith(f"{manifest}: source.model: {hub_model.repo_id!r}: {WEIGHTS}: the download was interrupted")
    assert "run again" in line and "HF_ENDPOINT" in line
    gets = weight_gets(hub)
    assert (gets[0]["range"], gets[0]["bytes"]) == (None, cut)
    partial = cache / "hub" / PARTIAL_DIR / hub_model.sha256(WEIGHTS)
    kept = partial.stat().st_size
    assert 0 < kept <= cut  # a reset may drop what was still in flight
    # It gave up after attempts that added nothing, each asking for the rest from what it had.
    stalled = [(g["range"], g["bytes"]) for g in gets[-ATTEMPTS_WITHOUT_PROGRESS:]]
    assert stalled == [(f"bytes={kept}-", 0)] * ATTEMPTS_WITHOUT_PROGRESS
    assert instant_retries == [RETRY_PAUSE_S * 2 ** n for n in range(ATTEMPTS_WITHOUT_PROGRESS - 1)]  # the pauses
    assert not snapshot(cache, hub_model, hub_model.second).joinpath(WEIGHTS).exists()  # nothing a bake would read
    assert not list((cache / "objects").glob("*/*/artifact.json"))

    hub.reset()
    result = run_cli("build", manifest, "--cache-dir", cache)
    assert result.code == 0, result.err
    [resumed] = weight_gets(hub)
    assert (resumed["status"], resumed["range"], resumed["bytes"]) == (206, f"bytes={kept}-", size - kept)
    assert sha256_file(snapshot(cache, hub_model, hub_model.second) / WEIGHTS) == hub_model.sha256(WEIGHTS)
    assert not partial.exists()


def test_a_partial_file_that_is_not_a_prefix_of_the_file_is_fetched_again(hub, hub_model, hf_env, tmp_path, run_cli):
    from so8t_deploy.external.hub import PARTIAL_DIR

    size, cache = len(hub_model.repo.read(WEIGHTS)), tmp_path / "cache"
    partial = cache / "hub" / PARTIAL_DIR / hub_model.sha256(WEIGHTS)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * (size // 2))  # what a crash may leave: the right length, not the right bytes
    result = run_cli("build", hub_manifest(tmp_path / "m.yaml", hub_model.repo_id), "--cache-dir", cache)
    assert result.code == 0, result.err
    assert [(g["status"], g["range"]) for g in weight_gets(hub)] == [(206, f"bytes={size // 2}-"), (200, None)]
    assert sha256_file(snapshot(cache, hub_model, hub_model.second) / WEIGHTS) == hub_model.sha256(WEIGHTS)


def test_a_damaged_file_in_the_hub_cache_is_never_handed_to_a_bake_and_is_fetched_again(hub, hub_model, hf_env,
                                                                                         tmp_path):
    """At the adapter: a cached snapshot is checked against the digests the plan saw, not taken on faith."""
    from so8t_deploy.external.hub import download, resolve_revision
    from so8t_deploy.store.hashing import DigestCache

    origin, warnings = "m.yaml: source.model", []
    digests = DigestCache(tmp_path / "digests.json")
    revision = resolve_revision(hub_model.repo_id, None, origin=origin)
    local = download(revision, tmp_path, digests, origin=origin)
    Path(os.path.realpath(local / "config.json")).write_text("{}")
    hub.reset()
    assert sha256_file(download(revision, tmp_path, digests, origin=origin, warn=warnings.append)
                       / "config.json") == hub_model.sha256("config.json")
    assert hub.fetched() == ["config.json"]
    assert warnings == [f"m.yaml: source.model: {hub_model.repo_id!r} at {hub_model.second}: config.json in the hub "
                        "cache differs from the hub's digest (damaged since it was downloaded?); fetching it again"]


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime-changed", "mtime-kept"])
def test_a_cached_hub_weight_damaged_after_download_is_fetched_again_before_a_bake(hub, hub_model, hf_env, tmp_path,
                                                                                   run_cli, keep_mtime):
    """Stamps (size, mtime, inode, ctime) catch damage cheaply, an mtime set back included; --verify-cache hashes."""
    manifest, cache = hub_manifest(tmp_path / "m.yaml", hub_model.repo_id), tmp_path / "cache"
    result = run_cli("build", manifest, "--cache-dir", cache, "--json")
    assert result.code == 0, result.err
    [built] = json.loads(result.out)["artifacts"]
    blob = Path(os.path.realpath(snapshot(cache, hub_model, hub_model.second) / WEIGHTS))
    before = os.stat(blob)
    with blob.open("r+b") as f:  # one bit of the first tensor's data, the size unchanged
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        value = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([value[0] ^ 4]))
    if keep_mtime:
        os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    shutil.rmtree(cache / "objects")  # so the bake runs again
    hub.reset()
    result = run_cli("build", manifest, "--cache-dir", cache, "--json", *(["--verify-cache"] if keep_mtime else []))
    assert result.code == 0, result.err
    assert f"{WEIGHTS} in the hub cache differs from the hub's digest" in result.err
    assert hub.fetched() == [WEIGHTS]
    assert sha256_file(blob) == hub_model.sha256(WEIGHTS)
    assert json.loads(result.out)["artifacts"][0]["sha256"] == built["sha256"]  # baked from the hub's bytes


@pytest.mark.parametrize(("patch", "says"), [
    ({WEIGHTS: {"lfs": {"sha256": "../../somewhere/file", "size": 1, "pointerSize": 1}}},
     f"the hub's metadata gives {WEIGHTS} the sha256 '../../somewhere/file', which is not one"),
    ({"config.json": {"rfilename": "../../somewhere/config.json"}},
     "the hub's metadata names a file '../../somewhere/config.json', which is not a path inside the repository"),
    ({"config.json": {"blobId": "../x"}}, "the hub's metadata gives config.json the git blob id '../x'"),
], ids=["lfs-sha256", "file-name", "blob-id"])
def test_hub_metadata_that_would_become_a_path_is_refused(hub, hub_model, hf_env, tmp_path, run_cli, patch, says):
    hub.faults(sibling_patch=patch)
    manifest, cache = hub_manifest(tmp_path / "m.yaml", hub_model.repo_id), tmp_path / "work" / "cache"
    for command in ("plan", "build"):
        result = run_cli(command, manifest, "--cache-dir", cache)
        assert result.code == 1, result.err
        line = error_line(result)
        assert line.startswith(f"{manifest}: source.model: {hub_model.repo_id!r}: ") and says in line, line
    assert hub.fetched() == []
    assert not [p for p in tmp_path.rglob("*") if "somewhere" in p.name]


@pytest.mark.parametrize(("answer", "says"), [
    ({"status": 200, "content_type": "text/html", "body": "<html><body>Sign in to the proxy</body></html>"},
     "answered with something that is not the hub's API (an HTML page, a proxy's login page?): check HF_ENDPOINT"),
    ({"status": 401, "content_type": "text/plain", "body": "Unauthorized"},
     "answered 401 Unauthorized without saying why: it wants a token: set HF_TOKEN"),
], ids=["html", "bare-401"])
def test_a_hub_that_answers_but_not_as_the_hub_says_so(hub, hub_model, hf_env, tmp_path, run_cli, answer, says):
    hub.faults(api_answer=answer)
    result = run_cli("plan", hub_manifest(tmp_path / "m.yaml", hub_model.repo_id), "--cache-dir", tmp_path / "cache")
    assert result.code == 1, result.err
    assert says in error_line(result) and "not reachable" not in result.err


def test_a_plan_saved_during_a_hub_outage_recreates_nothing_and_keeps_every_backup(
        pool, hub, hub_model, hf_env, tmp_path, run_cli, monkeypatch):
    [url] = pool.start(1)
    cache = tmp_path / "cache"
    for version in ("one", "two"):  # two releases: the tag, and its backup
        path = hub_manifest(tmp_path / f"{version}.yaml", hub_model.repo_id, [url], system=f"Version {version}.")
        assert run_cli("apply", path, "--cache-dir", cache).code == 0
    deployed = {m.model: m.digest for m in ollama.Client(host=url, timeout=30).list().models}
    assert set(deployed) == {TAG, f"{TAG}-prev"}
    pool.server(url).clear_requests()

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the hub is out of reach
    saved = tmp_path / "plan.json"
    result = run_cli("plan", path, "--cache-dir", cache, "--out", saved)
    assert result.code == 1 and "pass --allow-unknown-keys to save it" in error_line(result)
    assert not saved.exists()
    result = run_cli("plan", path, "--cache-dir", cache, "--check")
    assert result.code == 1 and "plan --check: could not observe the hub" in error_line(result)
    result = run_cli("plan", path, "--cache-dir", cache, "--out", saved, "--allow-unknown-keys", "--json")
    assert result.code == 0, result.err
    assert ("create", TAG) in {(a["kind"], a["tag"]) for a in json.loads(result.out)["hosts"][0]["actions"]}

    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # back
    result = run_cli("apply", path, "--cache-dir", cache, "--plan", saved, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)["hosts"][0]
    assert report["unchanged"] == [TAG] and report["created"] == [] and report["promoted"] == []
    assert {m.model: m.digest for m in ollama.Client(host=url, timeout=30).list().models} == deployed
    assert [r["path"] for r in pool.server(url).requests() if r["method"] in ("POST", "DELETE")
            and r["path"] != "/api/show"] == []


# --- access, errors and an unreachable hub -------------------------------------------------------------------------

def test_a_gated_repo_needs_hf_token(pool, hub, hub_model, hf_env, tmp_path, run_cli, monkeypatch):
    hub_model.repo.gate(["hf_granted"])
    [url] = pool.start(1)
    cache = tmp_path / "cache"
    manifest = hub_manifest(tmp_path / "m.yaml", hub_model.repo_id, [url])
    for command in ("plan", "apply"):
        result = run_cli(command, manifest, "--cache-dir", cache)
        assert result.code == 1, result.err
        line = error_line(result)
        assert line.startswith(f"{manifest}: source.model: {hub_model.repo_id!r}")
        assert "is gated on the hub and no token was sent" in line and "set HF_TOKEN" in line
        assert [ln for ln in result.err.splitlines() if "HF_TOKEN" in ln] == [line]
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    result = run_cli("plan", manifest, "--cache-dir", cache)
    assert result.code == 1 and "the token sent (HF_TOKEN) is not granted access" in error_line(result)
    assert hub.fetched() == []
    assert ollama.Client(host=url, timeout=30).list().models == []

    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    hub.reset()
    result = run_cli("apply", manifest, "--cache-dir", cache)
    assert result.code == 0, result.err
    assert set(hub.fetched()) == bake_files(hub_model, hub_model.second)
    gets = hub.requests(method="GET")
    # The token goes to the hub, never to the LFS storage (another origin, like the Hub's CDN).
    assert {r["authorization"] for r in gets if r["server"] == "hub"} == {True}
    assert {r["authorization"] for r in gets if r["server"] == "lfs"} == {False}


@pytest.mark.parametrize(("repo", "revision", "code", "says"), [
    ("so8t-test/no-such-repo", None, 2, "no such repository on http://127.0.0.1:"),
    (None, "no-such-branch", 2, "no such revision on the hub: set source.revision"),
])
def test_a_missing_repo_or_revision_is_one_line_naming_the_manifest(hub, hub_model, hf_env, tmp_path, run_cli, repo,
                                                                    revision, code, says):
    repo = repo or hub_model.repo_id
    manifest = hub_manifest(tmp_path / "m.yaml", repo, revision=revision)
    result = run_cli("plan", manifest, "--cache-dir", tmp_path / "cache")
    assert result.code == code, result.err
    line = error_line(result)
    assert line.startswith(f"{manifest}: source.model: {repo!r}") and says in line, line


def test_an_unreachable_hub_plans_with_unknown_keys_and_apply_fails_without_a_stale_snapshot(
        pool, hub, hub_model, hf_env, tmp_path, run_cli, monkeypatch):
    [url] = pool.start(1)
    cache = tmp_path / "cache"
    manifest = hub_manifest(tmp_path / "m.yaml", hub_model.repo_id, [url])
    assert run_cli("apply", manifest, "--cache-dir", cache).code == 0
    deployed = {m.model: m.digest for m in ollama.Client(host=url, timeout=30).list().models}
    artifacts = sorted((cache / "objects").glob("*/*/artifact.json"))
    retrained(hub_model)  # main moves on while the hub is out of reach: the cache still has where main was

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    result = run_cli("plan", manifest, "--cache-dir", cache, "--json")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["source"] == hub_model.repo_id and plan["note"] == "key known after download"
    assert all(step["key"] is None and step["note"] == "key known after download" for step in plan["builds"])
    warning = next(ln for ln in result.err.splitlines() if "not reachable" in ln)
    assert f"{manifest}: source.model: {hub_model.repo_id!r}" in warning

    result = run_cli("apply", manifest, "--cache-dir", cache)
    assert result.code == 1
    line = error_line(result)
    assert line.startswith(f"{manifest}: source.model: {hub_model.repo_id!r}: the hub at http://127.0.0.1:9 is not "
                           "reachable")
    assert "use a local directory, or set HF_ENDPOINT to a mirror" in line
    assert {m.model: m.digest for m in ollama.Client(host=url, timeout=30).list().models} == deployed
    assert sorted((cache / "objects").glob("*/*/artifact.json")) == artifacts  # nothing built from the old snapshot


# --- where the hub cache lives -------------------------------------------------------------------------------------

RUN_CLI_ON_LOOPBACK = """\
import sys
from tests.hub_fixtures import loopback_only
with loopback_only() as offsite:
    from so8t_deploy.cli.app import main
    code = main(sys.argv[1:])
if offsite:
    print(f"looked up {offsite}", file=sys.stderr)
    code = 99
sys.exit(code)
"""


def run_cli_process(args: list[object], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`so8t-deploy ARGS` in a new process, as a user runs it: huggingface_hub imported fresh under `env`."""
    return subprocess.run([sys.executable, "-c", RUN_CLI_ON_LOOPBACK, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_hub_cache_lives_in_the_cache_dir(hub, hub_model, tmp_path):
    """Fresh processes, with HF_ENDPOINT set as a user sets it. Telemetry is not turned off here: the product does
    that itself. Nothing is written to HF_HOME or to ~/.cache/huggingface."""
    home, hf_home, cache = tmp_path / "home", tmp_path / "hf-home", tmp_path / "cache"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in HF_UNSET and not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), HF_ENDPOINT=hub.url, NO_PROXY="127.0.0.1,localhost")
    manifest = hub_manifest(tmp_path / "m.yaml", hub_model.repo_id)

    plan = run_cli_process(["plan", manifest, "--cache-dir", cache], {**env, "HF_HOME": str(hf_home)})
    assert plan.returncode == 0, plan.stderr
    build = run_cli_process(["build", manifest, "--cache-dir", cache, "--json"], env)  # HF_HOME unset: the default
    assert build.returncode == 0, build.stderr

    assert not hf_home.exists() or not any(hf_home.rglob("*"))
    assert not (home / ".cache" / "huggingface").exists()
    assert set(hub.fetched()) == bake_files(hub_model, hub_model.second)
    local = snapshot(cache, hub_model, hub_model.second)
    assert {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} == bake_files(
        hub_model, hub_model.second)
    for path in local.rglob("*"):
        assert os.path.realpath(path).startswith(str(cache / "hub")), path
    assert not hub.requests(path="/api/agent-harnesses")  # telemetry stayed off
