"""scripts/build_llama_wheel.py, what `make` runs to build llama.cpp: heartbeat, progress, cache and failure.

A stand-in for `pip wheel` plays the slow compile, so these run in seconds; the real build is what every fresh
machine (CI) runs through the same code.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest

from .conftest import REPO

spec = importlib.util.spec_from_file_location("build_llama_wheel", REPO / "scripts" / "build_llama_wheel.py")
build_llama_wheel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_llama_wheel)

FAKE_PIP = """\
import pathlib, sys, time
out = pathlib.Path(sys.argv[sys.argv.index("-w") + 1])
for step in range(1, 4):
    print(f"  [{step}/3] /usr/bin/gcc -O3 -c /tmp/build/vendor/llama.cpp/ggml/src/part{step}.c", flush=True)
    time.sleep(0.4)
if "fail" in sys.argv[-1]:
    print("error: compiler exploded", flush=True)
    sys.exit(3)
(out / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"wheel")
"""


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP)
    monkeypatch.setattr(build_llama_wheel, "HEARTBEAT_S", 0.3)
    return (sys.executable, str(script))  # then what build() passes to pip: "wheel", "-v", ..., "-w", DIR, SDIST


def test_the_heartbeat_is_at_most_a_minute_apart():
    assert build_llama_wheel.HEARTBEAT_S <= 60


def test_build_prints_a_heartbeat_with_progress_and_publishes_the_wheel(tmp_path, fake_pip, capsys):
    out_dir = tmp_path / "cache" / "llama-cpp-python-0.3.36-key"
    out_dir.parent.mkdir()
    assert build_llama_wheel.build(tmp_path / "llama_cpp_python-0.3.36.tar.gz", out_dir, pip=fake_pip) == 0
    printed = capsys.readouterr().out
    beats = [line for line in printed.splitlines() if "still building llama.cpp" in line]
    assert beats, printed
    assert any("/3 steps done, last: part" in line for line in beats), printed
    assert (out_dir / ".complete").is_file()
    assert (out_dir / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").read_bytes() == b"wheel"
    assert "CPU-min); cached in" in printed
    assert [p.name for p in out_dir.parent.iterdir()] == [out_dir.name]  # no staging left


def test_a_failed_build_prints_the_end_of_its_log_and_caches_nothing(tmp_path, fake_pip, capsys):
    out_dir = tmp_path / "llama-cpp-python-0.3.36-key"
    assert build_llama_wheel.build(tmp_path / "fail.tar.gz", out_dir, pip=fake_pip) == 3
    err = capsys.readouterr().err
    assert "llama.cpp build failed; the end of its log:" in err and "error: compiler exploded" in err
    assert not out_dir.exists()
    assert (tmp_path / "llama-cpp-python-0.3.36-key.failed.log").is_file()


def test_a_cached_wheel_is_not_built_again(tmp_path, capsys):
    out_dir = tmp_path / "llama-cpp-python-0.3.36-key"
    out_dir.mkdir()
    (out_dir / ".complete").touch()
    assert build_llama_wheel.main([str(tmp_path / "missing.tar.gz"), str(out_dir)]) == 0
    assert "cached in" in capsys.readouterr().out


@pytest.mark.parametrize(("elapsed_s", "expected"), [
    (65, "still building llama.cpp (1 min so far; about 4 min in all on 2 cores)"),
    (600, "still building llama.cpp (10 min so far; expected about 4 min on 2 idle cores: this machine is busy"),
])
def test_heartbeat_says_how_long_it_should_take(monkeypatch, elapsed_s, expected):
    monkeypatch.setattr(build_llama_wheel, "CORE_MINUTES", 8.0)
    assert build_llama_wheel.heartbeat(elapsed_s, 2, "").startswith(expected)


def test_compile_progress_reads_ninja_and_make_lines(tmp_path):
    log = tmp_path / "build.log"
    log.write_text(textwrap.dedent("""\
        Installing build dependencies: done
          [14/140] /usr/bin/gcc -DX -c /tmp/pip-req-build/vendor/llama.cpp/ggml/src/ggml-cpu/ggml-cpu.c
        """))
    assert build_llama_wheel.compile_progress(log) == "14/140 steps done, last: ggml-cpu.c"
    log.write_text("[ 42%] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o\n")
    assert build_llama_wheel.compile_progress(log) == "42% done, last: llama.cpp.o"
    log.write_text("Collecting scikit-build-core\n")
    assert build_llama_wheel.compile_progress(log) == ""
