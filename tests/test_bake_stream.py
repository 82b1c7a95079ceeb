"""The bake's fast paths: the device path, direct IO, the phase breakdown, and how inputs are identified.

Each fast path must give the bytes the plain one gives: the device path (a GPU's, run here on the CPU
device) against the host threads, a write past the page cache against one through it.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import blake3
import pytest
import torch

from so8t_deploy.bake import bake as bake_module
from so8t_deploy.bake import safetensors_io
from so8t_deploy.bake.bake import bake_model
from so8t_deploy.bake.edits import AddLowRank, DoraLowRank, LeftMultiply, RightMultiply, fold_in_chunks
from so8t_deploy.bake.maps import BlockDiagonalMap, ProjectedMap
from so8t_deploy.bake.phases import PHASES
from so8t_deploy.errors import UsageError
from so8t_deploy.manifest.schema import Scales
from so8t_deploy.store import hashing
from so8t_deploy.store.hashing import DigestCache, Stamp

GEN = torch.Generator().manual_seed(5)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=GEN, dtype=torch.float32)


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


def test_the_device_path_folds_exactly_as_the_host_threads():
    """Every kind of edit, in bf16 with chunks of 8 rows: the device path's bytes are the host path's."""
    weight = (0.02 * randn(96, 64)).to(torch.bfloat16)
    block = BlockDiagonalMap.from_generators(0.3 * randn(8, 8, 8), 0.7)
    out_block = BlockDiagonalMap.from_generators(0.3 * randn(12, 8, 8), 0.5)
    projected = ProjectedMap.from_generator(torch.linalg.qr(randn(64, 8))[0].T, 0.3 * randn(8, 8), 0.4)
    edits = [RightMultiply(projected, (16, 48)), RightMultiply(block),
             AddLowRank(randn(4, 64), randn(32, 4), 0.5, (0, 32)),
             DoraLowRank(randn(4, 64), randn(16, 4), 0.5, (48, 64), magnitude=randn(16).abs() + 0.5),
             LeftMultiply(out_block)]
    small = 64 * 4 * 8  # 8-row chunks
    host = torch.empty_like(weight)
    list(fold_in_chunks(weight, edits, torch.bfloat16, chunk_bytes=small, out=host))
    device = torch.cat(list(fold_in_chunks(weight, edits, torch.bfloat16, chunk_bytes=small,
                                           device=torch.device("cpu"))))
    assert torch.equal(host.view(torch.int16), device.view(torch.int16))
    assert not torch.equal(host, weight)


def test_a_bake_on_the_device_path_writes_the_host_paths_bytes(tiny_model, so8t_adapter, tmp_path):
    model, adapter = tiny_model("llama", dtype="bfloat16"), so8t_adapter(64, 2)
    host = bake_model(model, [(None, adapter)], tmp_path / "host", Scales(), device=None,
                      digests=DigestCache(tmp_path / "d1.json"))
    device = bake_model(model, [(None, adapter)], tmp_path / "device", Scales(), device="cpu",
                        digests=DigestCache(tmp_path / "d2.json"))
    assert host.folded == device.folded > 0
    assert shard_bytes(tmp_path / "host") == shard_bytes(tmp_path / "device")
    assert set(host.phases) == set(PHASES)
    assert host.phases["fold"]["cpu_s"] > 0 and host.phases["hash"]["wall_s"] > 0


@pytest.mark.parametrize(("setting", "expected"), [("host", None), ("cpu", torch.device("cpu")),
                                                   ("auto", None)])
def test_the_bake_device_setting(monkeypatch, setting, expected):
    monkeypatch.setenv("SO8T_BAKE_DEVICE", setting)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bake_module.bake_device() == expected


def test_a_bad_bake_device_setting_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SO8T_BAKE_DEVICE", "cuda:1")
    with pytest.raises(UsageError, match=r"^SO8T_BAKE_DEVICE: 'cuda:1', but no CUDA device is visible$"):
        bake_module.bake_device()
    monkeypatch.setenv("SO8T_BAKE_DEVICE", "gpu")
    with pytest.raises(UsageError, match=r"^SO8T_BAKE_DEVICE: 'gpu' is not auto, host or a torch device"):
        bake_module.bake_device()


def attention_only(so8t_adapter) -> Path:
    """An SO8T adapter on the attention inputs only: the MLP, norms and embeddings stay byte for byte."""
    return so8t_adapter(64, 2, sites=("attn_in",), triality=(), final=False)


def test_a_bake_writes_the_same_bytes_past_the_page_cache_or_through_it(tiny_model, so8t_adapter, tmp_path,
                                                                         refuse_direct_io):
    """Shards go to disk with O_DIRECT where the file system takes it, and through the page cache where it
    refuses the flag (tmpfs, some network file systems): the same bytes either way, copied tensors included."""
    model = tiny_model("llama")
    adapter = attention_only(so8t_adapter)
    direct = bake_model(model, [(None, adapter)], tmp_path / "direct", Scales(), digests=DigestCache(tmp_path / "a"))
    assert direct.copied > 0 and direct.phases["disk"]["wall_s"] > 0
    refuse_direct_io()
    cached = bake_model(model, [(None, adapter)], tmp_path / "cached", Scales(), digests=DigestCache(tmp_path / "b"))
    assert cached.copied == direct.copied
    assert shard_bytes(tmp_path / "direct") == shard_bytes(tmp_path / "cached")


def test_a_full_disk_fails_the_bake_and_leaves_nothing(tiny_model, so8t_adapter, tmp_path, monkeypatch):
    model = tiny_model("llama")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(OSError, match="No space left"):
        bake_model(model, [(None, attention_only(so8t_adapter))], tmp_path / "out", Scales(),
                   digests=DigestCache(tmp_path / "d"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


# --- identities -----------------------------------------------------------------------------------------------


@pytest.fixture
def settled(monkeypatch):
    """Stamps taken as if 10 s after every change: past the racy window (see hashing.RACY_NS)."""
    real = time.time_ns
    monkeypatch.setattr(hashing.time, "time_ns", lambda: real() + 10**10)


def flip_middle_byte(path: Path) -> None:
    """Flip one bit in the middle of the file, and set its mtime back: only the ctime still tells."""
    stat = path.stat()
    time.sleep(0.02)  # past the file system's timestamp tick, so the ctime moves
    with path.open("r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)[0]
        f.seek(stat.st_size // 2)
        f.write(bytes([byte ^ 0x01]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def test_a_changed_byte_is_seen_with_size_and_mtime_kept(tmp_path, settled):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(1 << 20))
    digests = DigestCache(tmp_path / "digests.json")
    before = digests.file(path)
    assert before == "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()
    assert digests.known(path) == before.removeprefix("blake3:")  # unchanged: taken on its stamp
    flip_middle_byte(path)
    assert digests.known(path) is None  # the ctime moved, though size and mtime did not
    assert digests.file(path) == "blake3:" + blake3.blake3(path.read_bytes()).hexdigest() != before


def test_a_stamp_taken_right_after_a_change_proves_nothing(tmp_path):
    """Git's racy case: a change in the same clock tick as the stamp would keep it, so such a stamp is not trusted."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 1000)
    digests = DigestCache(tmp_path / "digests.json")
    digests.file(path)
    assert digests.known(path) is None  # hashed within RACY_NS of its last change: hashed again next time
    # A download is hashed under its lock and then renamed into place: nothing else writes it meanwhile.
    digests.record(path, "b" * 64, "sha256", exclusive=True)
    assert digests.known(path, "sha256") == "b" * 64


def test_the_digest_cache_file_is_untrusted_input(tmp_path, settled):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"y" * 1000)
    stamp = Stamp.of(path)
    cache_file = tmp_path / "digests.json"
    good = {"stamp": stamp.as_list(), "taken": stamp.taken_ns, "blake3": "0" * 64}
    cache_file.write_text(json.dumps({
        str(path.resolve()): {**good, "blake3": "../../etc"},  # not a digest
        "a": [1, 2, 3, "old format"], "b": {**good, "stamp": [1, 2]}, "c": {**good, "extra": 1},
    }))
    digests = DigestCache(cache_file)
    assert digests.known(path) is None
    assert digests.file(path) == "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()
    cache_file.write_text("[not a mapping]")
    assert DigestCache(cache_file).known(path) is None


def test_a_verified_hub_sha256_is_the_identity_a_bake_trusts(tmp_path, settled):
    path = tmp_path / "blob"
    path.write_bytes(b"z" * 1000)
    digests = DigestCache(tmp_path / "digests.json")
    assert digests.identity(path) is None
    digests.record(path, "a" * 64, "sha256")
    assert digests.identity(path) == "sha256:" + "a" * 64
    digests.file(path)  # a BLAKE3 beside it does not replace the hub's identity
    assert digests.identity(path) == "sha256:" + "a" * 64
    with pytest.raises(ValueError, match="a sha256 digest recorded as blake3"):
        digests.record(path, "sha256:" + "a" * 64)


def test_a_bake_hashes_a_shard_once_then_trusts_its_stamp(tiny_model, so8t_adapter, tmp_path, settled,
                                                          monkeypatch):
    model, adapter = tiny_model("phi3"), so8t_adapter(64, 2)
    digests = DigestCache(tmp_path / "digests.json")
    first = bake_model(model, [(None, adapter)], tmp_path / "one", Scales(), digests=digests)
    assert first.phases["hash"]["wall_s"] > 0
    again = bake_model(model, [(None, adapter)], tmp_path / "two", Scales(), digests=DigestCache(digests.path))
    assert again.phases["hash"]["wall_s"] == 0  # the shard's identity was known: nothing hashed
    assert again.provenance["model_files"] == first.provenance["model_files"]


def test_the_writer_refuses_a_part_that_is_not_contiguous(tmp_path):
    spec = safetensors_io.OutputTensor("w", "F32", (4, 4))
    writer = safetensors_io.ShardWriter(tmp_path / "x.safetensors", [spec])
    with pytest.raises(RuntimeError, match="not contiguous"):
        writer.write("w", [torch.zeros(4, 4).t()])
    writer.abandon()
