"""AppendFile: the bake's output file, written past the page cache where the file system allows it.

Whatever path the bytes take (O_DIRECT, the page cache from the start, or the page cache after the
first write was refused), the file holds exactly what was appended, in order, and no padding.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from so8t_deploy.bake import append_file
from so8t_deploy.bake.append_file import ALIGN, AppendFile
from so8t_deploy.errors import ModelError

BUFFER = 4 * ALIGN  # small buffers, so a few KiB cross several of them


def direct_io_works(directory: Path) -> bool:
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def append_pieces(file: AppendFile, source: Path, seed: int) -> bytes:
    """Appends pieces of odd sizes, from memory and from `source`; returns what the file should hold."""
    rng = random.Random(seed)
    data = source.read_bytes()
    expected = bytearray()
    fd = os.open(source, os.O_RDONLY)
    try:
        for _ in range(40):
            offset, size = rng.randrange(len(data)), rng.choice([1, 7, ALIGN - 1, ALIGN, BUFFER + 3, 3 * BUFFER])
            piece = data[offset:offset + size]
            if rng.random() < 0.5:
                file.write(memoryview(piece))
            else:
                file.copy_from(fd, offset, len(piece))
            expected += piece
    finally:
        os.close(fd)
    return bytes(expected)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(random.Random(1).randbytes(5 * BUFFER + 123))
    return path


@pytest.mark.parametrize("direct", [True, False])
def test_the_file_holds_exactly_what_was_appended(tmp_path, source, direct):
    file = AppendFile(tmp_path / "out", buffer_bytes=BUFFER, direct=direct)
    assert file.direct == (direct and direct_io_works(tmp_path))
    expected = append_pieces(file, source, seed=2)
    assert len(expected) % ALIGN  # a tail that O_DIRECT has to pad, and the file must not keep
    assert file.size == len(expected)
    file.close()
    assert (tmp_path / "out").read_bytes() == expected


def test_a_file_system_that_refuses_o_direct_at_open_gets_the_page_cache(tmp_path, source, refuse_direct_io):
    refuse_direct_io()
    file = AppendFile(tmp_path / "out", buffer_bytes=BUFFER)
    assert not file.direct
    expected = append_pieces(file, source, seed=3)
    file.close()
    assert (tmp_path / "out").read_bytes() == expected


def test_a_file_system_that_refuses_the_first_direct_write_gets_the_page_cache(tmp_path, source, monkeypatch):
    if not direct_io_works(tmp_path):
        pytest.fail(f"{tmp_path}: this test needs a file system that takes O_DIRECT (the suite runs on one)")
    refused = []
    plain_pwrite = os.pwrite

    def refuse_direct(fd, data, offset):
        if append_file.fcntl.fcntl(fd, append_file.fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return plain_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    file = AppendFile(tmp_path / "out", buffer_bytes=BUFFER)
    expected = append_pieces(file, source, seed=4)
    file.close()
    assert refused == [0] and not file.direct
    assert (tmp_path / "out").read_bytes() == expected


def test_a_failed_write_surfaces_in_the_caller_and_the_file_can_be_given_up(tmp_path, source, monkeypatch):
    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    file = AppendFile(tmp_path / "out", buffer_bytes=BUFFER)
    with pytest.raises(OSError) as failed:
        for _ in range(4):  # the first full buffer's write fails in the background; the next hand-over raises it
            file.write(memoryview(bytes(BUFFER)))
    assert failed.value.errno == errno.ENOSPC
    file.abandon()  # releases the buffers even though a view of one was in the failed write


def test_a_failed_write_of_the_tail_surfaces_in_close(tmp_path, monkeypatch):
    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    file = AppendFile(tmp_path / "out", buffer_bytes=BUFFER)
    file.write(memoryview(b"x" * 10))
    with pytest.raises(OSError, match="No space left"):
        file.close()


def test_copying_past_the_end_of_the_source_is_a_model_error(tmp_path, source):
    file = AppendFile(tmp_path / "out", buffer_bytes=BUFFER)
    fd = os.open(source, os.O_RDONLY)
    try:
        with pytest.raises(ModelError, match="unexpected end of file"):
            file.copy_from(fd, source.stat().st_size - 10, 20)
    finally:
        os.close(fd)
        file.abandon()


def test_buffers_must_be_whole_blocks(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        AppendFile(tmp_path / "out", buffer_bytes=ALIGN + 1)
    assert not (tmp_path / "out").exists()
