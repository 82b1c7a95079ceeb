"""A damaged cached artifact is rebuilt, never trusted and never reported as invalid input."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from so8t_deploy.store.hashing import RACY_NS, sha256_file

from .demo_manifests import DEMO_TAGS, write_demo_manifest
from .ollama_server import ServerPool

pytestmark = pytest.mark.llamacpp
TAG = "so8t-demo:full-q8_0"


@pytest.fixture
def cache(built_demo, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(built_demo[1], copy, symlinks=True)  # copy2: sizes and mtimes as published
    return copy


def build(run_cli, manifest: Path, cache: Path, *options: str):
    result = run_cli("build", manifest, "--cache-dir", cache, "--json", *options)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    return result, report, {a["tag"]: a for a in report["artifacts"]}


def test_a_truncated_gguf_is_rebuilt_and_apply_then_succeeds(built_demo, cache, tmp_path, run_cli):
    demo_dir, _ = built_demo
    manifest = write_demo_manifest(tmp_path / "m.yaml", demo_dir, [])
    _, _, before = build(run_cli, manifest, cache)
    gguf = Path(before[TAG]["path"])
    with gguf.open("r+b") as f:
        f.truncate(gguf.stat().st_size // 2)  # a disk filled up, or someone's cleanup script

    result, report, after = build(run_cli, manifest, cache)
    assert f"{gguf} changed since it was built" in result.err and "rebuilding it" in result.err
    assert report["built"] == 1  # only the damaged quantize; its bake and f16 are intact
    assert after[TAG]["sha256"] == before[TAG]["sha256"] == sha256_file(gguf)

    gguf.write_bytes(gguf.read_bytes()[:1000])  # damaged again, this time on the way to a host
    pool = ServerPool(tmp_path / "hosts")
    try:
        [url] = pool.start(1)
        result = run_cli("apply", write_demo_manifest(tmp_path / "deploy.yaml", demo_dir, [url]), "--cache-dir",
                         cache, "--json")
        assert result.code == 0, result.err
        assert f"{gguf} changed since it was built" in result.err
        assert sorted(json.loads(result.out)["hosts"][0]["created"]) == DEMO_TAGS
    finally:
        pool.stop_all()
    assert sha256_file(gguf) == before[TAG]["sha256"]


def test_a_missing_file_is_rebuilt(built_demo, cache, tmp_path, run_cli):
    manifest = write_demo_manifest(tmp_path / "m.yaml", built_demo[0], [])
    _, _, before = build(run_cli, manifest, cache)
    gguf = Path(before[TAG]["path"])
    gguf.unlink()
    result, report, after = build(run_cli, manifest, cache)
    assert f"{gguf} is missing: rebuilding it" in result.err
    assert report["built"] == 1 and sha256_file(gguf) == before[TAG]["sha256"]


def test_same_size_damage_needs_verify_cache_and_is_then_rebuilt(built_demo, cache, tmp_path, run_cli):
    manifest = write_demo_manifest(tmp_path / "m.yaml", built_demo[0], [])
    _, _, before = build(run_cli, manifest, cache)
    gguf = Path(before[TAG]["path"])
    stat = gguf.stat()
    with gguf.open("r+b") as f:  # a flipped byte, with size and mtime kept: only the digest can tell
        f.seek(stat.st_size - 10)
        byte = f.read(1)
        f.seek(stat.st_size - 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    _, report, _ = build(run_cli, manifest, cache)
    assert report["built"] == 0  # the cheap stamp check cannot see it: that is what --verify-cache is for
    result, report, after = build(run_cli, manifest, cache, "--verify-cache")
    assert f"{gguf} does not hash to its recorded sha256: rebuilding it" in result.err
    assert report["built"] == 1 and sha256_file(gguf) == before[TAG]["sha256"]


def test_a_full_disk_is_one_line_and_leaves_nothing(built_demo, tmp_path, run_cli, monkeypatch):
    from so8t_deploy.bake import safetensors_io

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", disk_full)
    manifest = write_demo_manifest(tmp_path / "m.yaml", built_demo[0], [])
    cache = tmp_path / "fresh"
    result = run_cli("build", manifest, "--cache-dir", cache)
    assert result.code == 1
    assert result.err.strip().splitlines()[-1] == (
        f"{manifest}: bake: no space left on the device of {cache} (nothing partial was kept); "
        "free some, or choose another --cache-dir")
    assert "Traceback" not in result.err
    assert [p for p in (cache / "objects").rglob("*") if p.is_file()] == []


def test_an_unexpected_error_is_one_line_naming_the_step_and_type(built_demo, tmp_path, run_cli, monkeypatch):
    from so8t_deploy.bake import safetensors_io

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", bug)
    manifest = write_demo_manifest(tmp_path / "m.yaml", built_demo[0], [])
    result = run_cli("build", manifest, "--cache-dir", tmp_path / "fresh")
    assert result.code == 1
    assert "Traceback" not in result.err
    assert result.err.strip().splitlines()[-1] == (
        f"{manifest}: bake full: unexpected ZeroDivisionError: division by zero; run with -v for the traceback")
    verbose = run_cli("-v", "build", manifest, "--cache-dir", tmp_path / "fresh")
    assert verbose.code == 1 and "Traceback" in verbose.err and "ZeroDivisionError" in verbose.err


def test_a_byte_changed_in_a_model_shard_is_baked_again(built_demo, cache, tmp_path, run_cli):
    """One byte flipped in the middle of a shard, its size and mtime kept. A local input is identified by its
    BLAKE3, remembered by the file's stamp, which includes the ctime: no program can set that back, so the
    flip is seen, the shard is hashed again, and its new digest makes a new bake key."""
    demo = tmp_path / "demo"
    shutil.copytree(built_demo[0], demo)  # the session's demo model stays as it is
    manifest = write_demo_manifest(tmp_path / "m.yaml", demo, [])
    time.sleep(RACY_NS / 1e9)  # past the racy window: the first hash below is then trusted by its stamp alone
    result, report, before = build(run_cli, manifest, cache)
    # The same bytes: both bakes come from the cache (the GGUFs name the new path, so they are made again).
    assert "hashing" in result.err and (report["built"], report["reused"]) == (4, 2)
    result, report, _ = build(run_cli, manifest, cache)
    assert "hashing" not in result.err and report["built"] == 0  # the stamps hold: nothing hashed again

    [shard] = (demo / "model").glob("*.safetensors")
    stat = shard.stat()
    with shard.open("r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)[0]
        f.seek(stat.st_size // 2)
        f.write(bytes([byte ^ 0x01]))  # a low bit: the weight stays finite
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    result, report, after = build(run_cli, manifest, cache)
    assert "hashing" in result.err
    assert (report["built"], report["reused"]) == (6, 0)  # 2 x (bake, convert, quantize), from the new bytes
    assert {tag: a["sha256"] for tag, a in after.items()}.keys() == before.keys()
    assert all(after[tag]["sha256"] != before[tag]["sha256"] for tag in before)
