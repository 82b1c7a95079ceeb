"""Tests of the Hub-compatible test server (tests/hub_server.py) through the real huggingface_hub client."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.hub_fixtures import hf_environ, loopback_only, point_hf_at
from tests.hub_repos import git_blob_id
from tests.hub_server import HubTestServer
from tests.server_process import REPO

BAKE_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model"]


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def local_files(snapshot: str | Path) -> list[str]:
    root = Path(snapshot)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --- downloads ---------------------------------------------------------------------------------------------

def test_snapshot_download_fetches_only_the_allowed_files(hf_env, hub, hub_model):
    from huggingface_hub import snapshot_download

    path = snapshot_download(hub_model.repo_id, allow_patterns=BAKE_PATTERNS)

    expected = sorted(p for p in hub_model.repo.files() if p.endswith((".safetensors", ".json")) or
                      p == "tokenizer.model")
    assert "model.safetensors" in expected and "tokenizer.model" in expected
    assert local_files(path) == expected
    assert hub.fetched() == expected  # nothing else was downloaded: no decoy, no README
    assert not set(hub_model.decoys) & set(hub.fetched())
    assert Path(path).name == hub_model.second
    for name in expected:
        assert sha256_file(Path(path) / name) == hub_model.sha256(name)
    # The cache names an LFS file's blob by its sha256 (the ETag the client kept), a regular file's by its git id.
    assert Path(os.path.realpath(Path(path) / "model.safetensors")).name == hub_model.sha256("model.safetensors")
    config = (Path(path) / "config.json").read_bytes()
    assert Path(os.path.realpath(Path(path) / "config.json")).name == git_blob_id(config)


@pytest.mark.parametrize("revision", ["commit", "tag"])
def test_revision_pins_the_snapshot(hf_env, hub, hub_model, revision):
    from huggingface_hub import snapshot_download

    pinned = hub_model.first if revision == "commit" else hub_model.tag
    path = snapshot_download(hub_model.repo_id, revision=pinned, allow_patterns=["*.safetensors"])

    assert Path(path).name == hub_model.first
    assert sha256_file(Path(path) / "model.safetensors") == hub_model.sha256("model.safetensors", hub_model.first)
    assert hub_model.sha256("model.safetensors", hub_model.first) != hub_model.sha256("model.safetensors")
    info_requests = [r for r in hub.requests(method="GET") if r["path"].startswith("/api/models/")
                     and "/tree/" not in r["path"]]
    # A full commit sha needs no resolving: the client goes straight to the tree. A tag asks model_info once.
    assert len(info_requests) == (0 if revision == "commit" else 1)


def test_moved_branch_gives_another_commit(hf_env, hub_model):
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    assert api.model_info(hub_model.repo_id).sha == hub_model.second
    hub_model.repo.set_branch("main", hub_model.first)
    assert api.model_info(hub_model.repo_id).sha == hub_model.first
    resolved = api.resolve_revision(hub_model.repo_id, revision="main")
    assert (resolved.resolved, str(resolved)) == (hub_model.first, "main")  # the string is still the branch name
    assert api.model_info(hub_model.repo_id, revision="main").sha == hub_model.first
    path = snapshot_download(hub_model.repo_id, allow_patterns=["*.safetensors"])
    assert Path(path).name == hub_model.first
    assert sha256_file(Path(path) / "model.safetensors") == hub_model.sha256("model.safetensors", hub_model.first)


# --- metadata without downloading ----------------------------------------------------------------------------

def test_model_info_files_metadata_gives_each_file_sha256_without_downloading(hf_env, hub, hub_model):
    from huggingface_hub import HfApi

    api = HfApi()
    for revision in (hub_model.first, "main"):
        info = api.model_info(hub_model.repo_id, revision=revision, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings}
        assert sorted(siblings) == sorted(hub_model.repo.files(revision))
        for name in [*hub_model.weights, "tokenizer.model", *hub_model.decoys]:
            assert siblings[name].lfs is not None, name
            assert siblings[name].lfs.sha256 == hub_model.sha256(name, revision)
            assert siblings[name].lfs.size == siblings[name].size == len(hub_model.repo.read(name, revision))
        config = hub_model.repo.read("config.json", revision)
        assert siblings["config.json"].lfs is None
        assert siblings["config.json"].blob_id == git_blob_id(config)
        assert siblings["config.json"].size == len(config)
    assert info.sha == hub_model.second
    assert info.safetensors.total > 0 and set(info.safetensors.parameters) == {"F32"}
    assert [s.size for s in api.model_info(hub_model.repo_id).siblings] == [None] * len(siblings)  # blobs=false
    assert hub.fetched() == []


def test_tree_and_paths_info_give_lfs_sha256(hf_env, hub_model):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    api = HfApi()
    top = {e.path: e for e in api.list_repo_tree(hub_model.repo_id, revision=hub_model.first)}
    assert isinstance(top["onnx"], RepoFolder) and "onnx/model.onnx" not in top
    everything = {e.path: e for e in api.list_repo_tree(hub_model.repo_id, recursive=True)}
    assert isinstance(everything["onnx/model.onnx"], RepoFile)
    assert everything["model.safetensors"].lfs.sha256 == hub_model.sha256("model.safetensors")
    assert top["model.safetensors"].lfs.sha256 == hub_model.sha256("model.safetensors", hub_model.first)
    infos = api.get_paths_info(hub_model.repo_id, ["model.safetensors", "onnx", "missing.bin"], revision=hub_model.tag)
    assert [type(e).__name__ for e in infos] == ["RepoFile", "RepoFolder"]
    assert infos[0].lfs.sha256 == hub_model.sha256("model.safetensors", hub_model.first)
    assert infos[0].blob_id != infos[0].lfs.sha256  # the git id of the LFS pointer, not the content


def test_file_metadata_headers(hf_env, hub_model):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    lfs = get_hf_file_metadata(hf_hub_url(hub_model.repo_id, "model.safetensors"))
    assert (lfs.etag, lfs.commit_hash, lfs.size) == (hub_model.sha256("model.safetensors"), hub_model.second,
                                                     len(hub_model.repo.read("model.safetensors")))
    assert lfs.location.startswith("http://127.0.0.1:") and not lfs.location.startswith(hf_env.endpoint)
    regular = get_hf_file_metadata(hf_hub_url(hub_model.repo_id, "config.json", revision=hub_model.tag))
    config = hub_model.repo.read("config.json", hub_model.first)
    assert (regular.etag, regular.commit_hash, regular.size) == (git_blob_id(config), hub_model.first, len(config))


def test_range_requests(hub, hub_model):
    url = f"{hub.url}/{hub_model.repo_id}/resolve/main/config.json"
    config = hub_model.repo.read("config.json")
    part = httpx.get(url, headers={"Range": "bytes=2-9"})
    assert (part.status_code, part.content, part.headers["Content-Range"]) == (206, config[2:10],
                                                                                f"bytes 2-9/{len(config)}")
    assert httpx.get(url, headers={"Range": "bytes=-4"}).content == config[-4:]
    past = httpx.get(url, headers={"Range": f"bytes={len(config)}-"})
    assert (past.status_code, past.headers["Content-Range"]) == (416, f"bytes */{len(config)}")
    lfs = httpx.get(f"{hub.url}/{hub_model.repo_id}/resolve/main/model.safetensors", headers={"Range": "bytes=0-7"},
                    follow_redirects=True)
    assert lfs.status_code == 206 and lfs.content == hub_model.repo.read("model.safetensors")[:8]


def test_a_cut_counted_from_the_file_cuts_a_resumed_get_at_the_same_place(hub, hub_model):
    """cut_counted_from="file": the cut is an offset in the file, so a GET that resumes past it gets nothing."""
    url = f"{hub.url}/{hub_model.repo_id}/resolve/main/config.json"
    config = hub_model.repo.read("config.json")
    hub.faults(cut_file="config.json", cut_after_bytes=10, cut_counted_from="file", cut_times=3)
    for start in (0, 4, 12, 12):
        with contextlib.suppress(httpx.RemoteProtocolError):  # a body shorter than its Content-Length
            httpx.get(url, headers={"Range": f"bytes={start}-"})
    assert [(r["bytes"], r.get("cut")) for r in hub.requests(method="GET")] == [
        (10, "close"), (6, "close"), (0, "close"), (len(config) - 12, None)]


# --- interrupted downloads -------------------------------------------------------------------------------------

BIG = 12 << 20  # huggingface_hub writes in 10 MiB pieces: only a cut past the first one can resume with a Range


@pytest.fixture
def big_file(hub, request) -> tuple[str, bytes]:
    data = hashlib.sha256(b"big").digest() * (BIG // 32)
    repo = hub.hub.create_repo(f"so8t-test/big-{request.node.name[:40]}")
    repo.commit({"model.safetensors": data})
    return repo.repo_id, data


def test_interrupted_download_resumes_with_a_range(hf_env, hub, big_file):
    from huggingface_hub import hf_hub_download

    repo_id, data = big_file
    hub.faults(cut_file="model.safetensors", cut_after_bytes=(10 << 20) + 4321)
    path = hf_hub_download(repo_id, "model.safetensors")
    first, second = hub.requests(method="GET", file="model.safetensors")
    assert (first["cut"], first["range"], first["bytes"]) == ("close", None, (10 << 20) + 4321)
    assert (second["status"], second["range"]) == (206, f"bytes={10 << 20}-")
    assert second["server"] == "lfs" and not second["authorization"]
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_download_cut_early_starts_again_without_a_range(hf_env, hub, big_file):
    from huggingface_hub import hf_hub_download

    repo_id, data = big_file
    hub.faults(cut_file="model.safetensors", cut_after_bytes=5000)
    path = hf_hub_download(repo_id, "model.safetensors")
    first, second = hub.requests(method="GET", file="model.safetensors")
    assert first["cut"] == "close" and (second["status"], second["range"], second["bytes"]) == (200, None, len(data))
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_reset_connection_fails_the_download_and_leaves_no_partial_file(hf_env, hub, big_file):
    import httpx2
    from huggingface_hub import hf_hub_download

    repo_id, data = big_file
    hub.faults(cut_file="model.safetensors", cut_after_bytes=(10 << 20) + 4321, cut_mode="reset")
    with pytest.raises(httpx2.ReadError):  # not retried, and not wrapped in a huggingface_hub error
        hf_hub_download(repo_id, "model.safetensors")
    assert not [p for p in hf_env.cache_dir.rglob("*") if p.is_file() and p.parent.name == "blobs"]
    path = hf_hub_download(repo_id, "model.safetensors")
    assert [r["range"] for r in hub.requests(method="GET", file="model.safetensors")] == [None, None]
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# --- access and errors -----------------------------------------------------------------------------------------

def test_gated_repo_needs_a_granted_token(hf_env, hub, hub_model):
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError

    hub_model.repo.gate(["hf_granted"])
    assert HfApi().model_info(hub_model.repo_id).gated == "manual"  # metadata stays public, as on the Hub
    for token, status in ((None, 401), ("hf_other", 403)):
        with pytest.raises(GatedRepoError) as raised:
            snapshot_download(hub_model.repo_id, allow_patterns=["config.json"], token=token)
        assert raised.value.response.status_code == status
    assert hub.fetched() == []
    hub.reset()
    path = snapshot_download(hub_model.repo_id, allow_patterns=BAKE_PATTERNS, token="hf_granted")
    assert sha256_file(Path(path) / "model.safetensors") == hub_model.sha256("model.safetensors")
    gets = hub.requests(method="GET")
    # The token goes to the hub, never to the LFS storage (another origin, like the Hub's CDN).
    assert {r["authorization"] for r in gets if r["server"] == "hub"} == {True}
    assert {r["authorization"] for r in gets if r["server"] == "lfs"} == {False}


@pytest.mark.parametrize(("call", "missing"), [
    ("model_info", "repo"), ("snapshot_download", "repo"), ("hf_hub_download", "repo"),
    ("model_info", "revision"), ("snapshot_download", "revision"), ("hf_hub_download", "revision"),
    ("hf_hub_download", "file")])
def test_missing_things_raise_the_hub_errors(hf_env, hub_model, call, missing):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = "so8t-test/no-such-repo" if missing == "repo" else hub_model.repo_id
    revision = "no-such-branch" if missing == "revision" else None
    expected = {"repo": RepositoryNotFoundError, "revision": RevisionNotFoundError,
                "file": RemoteEntryNotFoundError}[missing]
    with pytest.raises(expected) as raised:
        if call == "model_info":
            HfApi().model_info(repo_id, revision=revision)
        elif call == "snapshot_download":
            snapshot_download(repo_id, revision=revision)
        else:
            hf_hub_download(repo_id, "no-such-file.json" if missing == "file" else "config.json", revision=revision)
    assert not isinstance(raised.value, GatedRepoError)
    assert raised.value.response.status_code == (401 if missing == "repo" else 404)


def test_missing_repo_with_a_token_is_a_404(hf_env, hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError) as raised:
        HfApi().model_info("so8t-test/no-such-repo", token="hf_any")
    assert raised.value.response.status_code == 404


def test_unreachable_hub_gives_the_cached_snapshot_without_an_error(tmp_path, monkeypatch):
    """What a caller cannot learn from snapshot_download: with the hub gone, a branch gives the cached snapshot of
    where the branch was, silently; only model_info fails."""
    import httpx2
    from huggingface_hub import HfApi, snapshot_download

    with HubTestServer(tmp_path / "repos") as server:
        repo = server.hub.create_repo("so8t-test/gone")
        before = repo.commit({"config.json": "{}"})
        point_hf_at(monkeypatch, server.url, tmp_path / "hf-home")
        with loopback_only() as offsite:
            assert Path(snapshot_download(repo.repo_id)).name == before
            repo.commit({"config.json": '{"moved": true}'})
    with loopback_only():
        assert Path(snapshot_download(repo.repo_id)).name == before
        with pytest.raises(httpx2.ConnectError):
            HfApi().model_info(repo.repo_id)
    assert offsite == []


# --- staying on this machine ------------------------------------------------------------------------------------

def test_loopback_guard_sees_an_offsite_request(hub, tmp_path, monkeypatch):
    """The check behind `hf_env` can fail: a call that ignores the endpoint is caught."""
    from huggingface_hub import HfApi

    point_hf_at(monkeypatch, hub.url, tmp_path / "hf-home")
    with loopback_only() as offsite, pytest.raises(Exception):  # noqa: B017 (any transport error will do)
        HfApi(endpoint="https://huggingface.co").model_info("so8t-test/anything")
    assert offsite == ["huggingface.co"]


def test_hf_endpoint_set_before_import_keeps_a_fresh_process_local(hub, hub_model, tmp_path):
    """The real way in: HF_ENDPOINT in the environment of a new process. Telemetry is left on here, to show that its
    one request (the agent registry) goes to the endpoint too."""
    script = (
        "import json, sys\n"
        "from tests.hub_fixtures import loopback_only\n"
        "with loopback_only() as offsite:\n"
        "    from huggingface_hub import snapshot_download\n"
        f"    path = snapshot_download({hub_model.repo_id!r}, allow_patterns=['*.safetensors'])\n"
        "print(json.dumps({'path': path, 'offsite': offsite}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(hf_environ(hub.url, tmp_path / "hf-home"))
    del env["HF_HUB_DISABLE_TELEMETRY"]
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["offsite"] == []
    assert sha256_file(Path(result["path"]) / "model.safetensors") == hub_model.sha256("model.safetensors")
    assert hub.requests(path="/api/agent-harnesses")
    assert hub.fetched() == ["model.safetensors"]
