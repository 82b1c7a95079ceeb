"""Split GGUF sets as llama.cpp's gguf-split --split-max-size writes them, and reading them back."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from so8t_deploy.errors import BuildError, ModelError, UsageError
from so8t_deploy.external import gguf_split
from so8t_deploy.external.gguf_info import read_gguf_info
from so8t_deploy.external.gguf_split import split_gguf, split_path
from so8t_deploy.external.llamacpp import convert_to_gguf, gguf_logits, locate_converter

pytestmark = pytest.mark.llamacpp  # the source GGUF comes from llama.cpp's converter

LIMIT = 2_000_000  # the tiny model's ~5.9 MB of tensors, at most 1 MiB each: 5 parts
TOKENS = [1, 17, 42, 99, 150, 201, 250, 299, 300, 5]
SPLIT_KEYS = ["split.no", "split.tensors.count", "split.count"]  # the order gguf-split leaves them in


def padded(n_bytes: int) -> int:
    return (n_bytes + 31) // 32 * 32  # GGML_PAD(nbytes, GGUF_DEFAULT_ALIGNMENT), as gguf-split counts


def kv_fields(reader: GGUFReader) -> dict[str, bytes]:
    """Each KV pair's bytes as encoded in the file, in file order (GGUF.*: the reader's header pseudo-fields)."""
    return {name: b"".join(p.tobytes() for p in f.parts) for name, f in reader.fields.items()
            if not name.startswith("GGUF.")}


@pytest.fixture(scope="module")
def source(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "model.f32.gguf"
    convert_to_gguf(locate_converter(), tiny_model("phi3", hidden_size=256), out, "f32",
                    metadata={"so8t.source_model": "tiny-phi3", "so8t.variant": "split-test"})
    return out


@pytest.fixture(scope="module")
def parts(source, tmp_path_factory) -> list[Path]:
    return split_gguf(source, tmp_path_factory.mktemp("split"), "model", LIMIT)


@pytest.fixture
def copied(parts, tmp_path) -> list[Path]:
    """A copy of the split set that a test may break."""
    return [Path(shutil.copy(p, tmp_path / p.name)) for p in parts]


def test_parts_are_named_as_llama_split_path(parts):
    n = len(parts)
    assert n >= 3
    assert [p.name for p in parts] == [f"model-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert sorted(p.name for p in parts[0].parent.iterdir()) == [p.name for p in parts]  # nothing else written


def test_only_the_first_part_carries_the_sources_kv(source, parts):
    source_kv = kv_fields(GGUFReader(source))
    n_tensors = len(GGUFReader(source).tensors)
    for index, part in enumerate(parts):
        reader = GGUFReader(part)
        kv = kv_fields(reader)
        copied = source_kv if index == 0 else {}
        assert list(kv) == [*copied, *SPLIT_KEYS]
        assert all(kv[name] == raw for name, raw in copied.items())  # byte for byte, not re-encoded
        split = {name: (reader.fields[name].types, reader.fields[name].contents()) for name in SPLIT_KEYS}
        assert split == {"split.no": ([GGUFValueType.UINT16], index),
                         "split.tensors.count": ([GGUFValueType.INT32], n_tensors),
                         "split.count": ([GGUFValueType.UINT16], len(parts))}


def test_every_tensor_is_copied_byte_for_byte_in_order(source, parts):
    want = [(t.name, int(t.tensor_type), t.shape.tolist(), t.data.tobytes()) for t in GGUFReader(source).tensors]
    got = [(t.name, int(t.tensor_type), t.shape.tolist(), t.data.tobytes())
           for part in parts for t in GGUFReader(part).tensors]
    assert got == want


@pytest.mark.parametrize("limit", ["boundary", 1_600_000, LIMIT])
def test_parts_follow_gguf_splits_size_rule(source, tmp_path, limit):
    sizes = [padded(int(t.n_bytes)) for t in GGUFReader(source).tensors]
    if limit == "boundary":  # the first tensors fill a split exactly: it is full, not over
        limit = next(total for total in itertools.accumulate(sizes) if total >= max(sizes))
    parts = split_gguf(source, tmp_path, "model", limit)
    split_sizes = [[padded(int(t.n_bytes)) for t in GGUFReader(p).tensors] for p in parts]
    assert len(parts) >= 3 and all(split_sizes)
    for this, following in zip(split_sizes[:-1], split_sizes[1:], strict=True):
        assert sum(this) <= limit < sum(this) + following[0]  # a split ends only when the next tensor won't fit
    assert sum(split_sizes[-1]) <= limit


def test_llama_cpp_loads_the_set_from_its_first_part(source, parts):
    assert np.array_equal(gguf_logits(parts[0], TOKENS), gguf_logits(source, TOKENS))


def test_info_of_a_split_set_is_that_of_the_unsplit_file(source, parts):
    whole, split = read_gguf_info(source), read_gguf_info(parts[0])
    assert whole.parts == (source,)
    assert split.parts == tuple(parts)
    assert (split.n_params, split.tensor_bytes, split.metadata, split.architecture, split.file_type) == \
        (whole.n_params, whole.tensor_bytes, whole.metadata, whole.architecture, whole.file_type)
    assert split.metadata  # so8t.* provenance is there to compare


def test_a_missing_part_is_a_model_error(copied):
    copied[1].unlink()
    with pytest.raises(ModelError, match=rf"{copied[1].name}: part 2 of a {len(copied)}-part split GGUF is missing"):
        read_gguf_info(copied[0])


def test_a_part_of_another_place_in_the_set_is_a_model_error(copied):
    shutil.copy(copied[1], copied[2])
    with pytest.raises(ModelError, match=rf"{copied[2].name}: expected part 3 .* found split.no=1"):
        read_gguf_info(copied[0])


def test_a_set_is_read_from_its_first_part_only(copied):
    with pytest.raises(ModelError, match="part 2 of a .* open its first part"):
        read_gguf_info(copied[1])


def test_a_tensor_larger_than_the_limit_is_refused_and_nothing_is_written(source, tmp_path):
    tensors = GGUFReader(source).tensors
    biggest = max(padded(int(t.n_bytes)) for t in tensors)
    name = next(t.name for t in tensors if padded(int(t.n_bytes)) == biggest)
    with pytest.raises(UsageError, match=rf"^quantize.split_max_size: {biggest - 1} bytes is less than tensor "
                                         rf"{name} of {source.name} \({biggest} bytes\): no split can hold it$"):
        split_gguf(source, tmp_path, "model", biggest - 1)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_no_parts(source, tmp_path, monkeypatch):
    calls = []
    copy_range = gguf_split._copy_range

    def failing(*args):
        calls.append(args)
        if len(calls) == 8:  # inside the second or a later part
            raise OSError(28, "No space left on device")
        copy_range(*args)

    monkeypatch.setattr(gguf_split, "_copy_range", failing)
    with pytest.raises(BuildError, match="writing the split set failed .No space left on device"):
        split_gguf(source, tmp_path, "model", LIMIT)
    assert list(tmp_path.iterdir()) == []


def test_a_file_already_there_is_neither_overwritten_nor_removed(source, parts, tmp_path):
    there = split_path(tmp_path / "model", 2, len(parts))
    there.write_text("someone else's")
    with pytest.raises(BuildError, match=re.escape(f"File exists: {there}")):
        split_gguf(source, tmp_path, "model", LIMIT)
    assert list(tmp_path.iterdir()) == [there] and there.read_text() == "someone else's"


def test_a_file_within_the_limit_is_not_split(source, tmp_path):
    assert split_gguf(source, tmp_path, "model", source.stat().st_size) == [source]
    # Over the limit with its metadata, but its tensors fit one split: gguf-split would write 00001-of-00001.
    tensor_bytes = sum(padded(int(t.n_bytes)) for t in GGUFReader(source).tensors)
    assert tensor_bytes < source.stat().st_size
    assert split_gguf(source, tmp_path, "model", tensor_bytes) == [source]
    assert list(tmp_path.iterdir()) == []


def test_a_first_part_with_its_own_alignment_is_laid_out_by_it_and_dims_are_ggmls(tmp_path):
    # gguf-split writes every part with 32-byte alignment, even a first part whose general.alignment
    # (copied from the source) says otherwise, and readers then miss its tensor data by the difference.
    src = tmp_path / "aligned.gguf"
    writer = GGUFWriter(src, "llama")
    writer.data_alignment = 64
    writer.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    for i in range(6):
        writer.add_tensor(f"t{i}", rng.standard_normal((3, 7 + i)).astype(np.float32))
    writer.add_tensor("row", rng.standard_normal((1, 5)).astype(np.float32))  # ne [5, 1]: two dimensions stored
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "out").mkdir()
    out = split_gguf(src, tmp_path / "out", "a", 300)
    readers = [GGUFReader(p) for p in out]
    assert len(out) >= 3 and [r.alignment for r in readers] == [64] + [32] * (len(out) - 1)
    assert all(r.data_offset % r.alignment == 0 for r in readers)
    got = {t.name: t.data.tobytes() for r in readers for t in r.tensors}
    assert got == {t.name: t.data.tobytes() for t in GGUFReader(src).tensors}
    # gguf.cpp writes ggml_n_dims(): a trailing dimension of 1 is not stored
    assert [t.shape.tolist() for t in readers[-1].tensors if t.name == "row"] == [[5]]


def test_split_path_is_llama_split_path():
    assert split_path("out/model", 0, 3) == Path("out/model-00001-of-00003.gguf")
    assert split_path(Path("m"), 11, 12) == Path("m-00012-of-00012.gguf")


def test_a_build_over_the_split_size_is_published_split_and_every_later_step_reads_it(tmp_path_factory):
    """The manifest's split_max_size: the converted f16 is split; the q8_0 quantized from that split set is split
    too; eval loads both; a re-build with --verify-cache trusts them (a split record's sha256 is over its parts)."""
    from so8t_deploy.demo import init_demo
    from so8t_deploy.deploy.commands import build_manifest, eval_manifest
    from so8t_deploy.manifest.loader import load_manifest
    from so8t_deploy.store.hashing import combined_digest, sha256_file
    from so8t_deploy.store.workspace import Workspace

    root = tmp_path_factory.mktemp("split-build")
    demo = init_demo(root / "demo")
    text = (demo / "manifest.yaml").read_text().split("targets:")[0]
    text = text.replace("quantize: [f16, q8_0]", "quantize: {types: [f16, q8_0], split_max_size: 1M}")
    (demo / "split.yaml").write_text(text.replace("    light: {rotation: 0.1, ffn: 0.05, triality: 0.02}\n", ""))
    manifest, workspace = load_manifest(demo / "split.yaml"), Workspace(root / "cache")
    report = build_manifest(manifest, workspace)
    for artifact in report.artifacts:
        record, directory = artifact.record, artifact.path.parent
        assert len(record.parts) >= 2 and artifact.path.name == record.parts[0]
        assert sorted(p.name for p in directory.glob("*.gguf")) == record.parts  # the unsplit file is gone
        assert record.size == sum((directory / p).stat().st_size for p in record.parts)
        assert record.sha256 == combined_digest({p: sha256_file(directory / p) for p in record.parts})
        assert max((directory / p).stat().st_size for p in record.parts[1:]) <= 1_000_000
    results = {r.quant: r for r in eval_manifest(manifest, workspace)}
    assert results["f16"].mean_kl == 0 and 0 < results["q8_0"].mean_kl < 0.01
    again = build_manifest(manifest, workspace, verify_cache=True)
    assert again.built == 0 and [a.sha256 for a in again.artifacts] == [a.sha256 for a in report.artifacts]
