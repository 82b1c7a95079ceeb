"""The converter's files come out of the pinned sdist in one pass, and an sdist that lacks the converter or holds
a member that is not a plain file or directory is refused before anything is published."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from so8t_deploy.errors import BuildError
from so8t_deploy.external import llamacpp

PREFIX = f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"


def sdist(path: Path, members: dict[str, bytes | None], links: tuple[str, ...] = ()) -> Path:
    """A .tar.gz with these files (None: a directory) and symlinks under the sdist's llama.cpp prefix."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(PREFIX + name)
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(PREFIX + name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    return path


def test_the_converter_files_and_nothing_else_are_extracted(tmp_path, monkeypatch):
    files = {"convert_hf_to_gguf.py": b"print('converter')\n", "gguf-py": None, "gguf-py/gguf/__init__.py": b"",
             "conversion": None, "conversion/base.py": b"x = 1\n", "LICENSE": b"MIT\n", "ggml/ggml.c": b"int x;\n"}
    monkeypatch.setenv("SO8T_LLAMA_CPP_SDIST", str(sdist(tmp_path / "s.tar.gz", files)))
    root = tmp_path / "converter"
    llamacpp._extract_converter(root)
    extracted = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {llamacpp._MARKER}
    assert extracted == {"convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py", "conversion/base.py", "LICENSE"}
    assert (root / "conversion" / "base.py").read_bytes() == b"x = 1\n"


@pytest.mark.parametrize(("files", "links", "error"), [
    ({"LICENSE": b"MIT\n"}, (), "no vendor/llama.cpp/convert_hf_to_gguf.py inside"),
    ({"convert_hf_to_gguf.py": b""}, ("conversion/evil.py",), "unexpected archive member 'conversion/evil.py'"),
    ({"convert_hf_to_gguf.py": b"", "conversion/../../escape.py": b""}, (), "unexpected archive member"),
])
def test_a_bad_sdist_is_refused_and_nothing_is_published(tmp_path, monkeypatch, files, links, error):
    monkeypatch.setenv("SO8T_LLAMA_CPP_SDIST", str(sdist(tmp_path / "s.tar.gz", files, links)))
    root = tmp_path / "cache" / "converter"
    with pytest.raises(BuildError, match=error):
        llamacpp._extract_converter(root)
    assert not root.exists()
    assert [p.name for p in root.parent.iterdir()] == [f".{root.name}.lock"]
    assert not (tmp_path / "escape.py").exists()
