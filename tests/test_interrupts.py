"""Interrupts and kills during a build: nothing partial published, no child process left behind.

Each test starts from a copy of the session's built demo cache with the later stages removed, so the
build goes straight to the step under test. The child doing the work (llama.cpp's converter or
quantizer, each in its own process) is frozen with SIGSTOP once it is at work: the signal then
surely arrives while that step is in progress, however fast the tiny model would have finished.
The quantize tests build one variant, so one quantizer runs and nothing at all may be published.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from so8t_deploy.store.workspace import Workspace

from .conftest import REPO
from .demo_manifests import write_demo_manifest

pytestmark = pytest.mark.llamacpp
_SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[os.uname().machine]


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after "(comm)": state, ppid, ...; None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children_running(parent: int, module: str) -> list[int]:
    """PIDs of live children of `parent` whose command line names `module`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (fields := stat_fields(entry.name)) is None:
            continue
        if int(fields[1]) != parent or fields[0] == "Z":
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if module in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def outlived(pid: int, timeout: float = 10) -> bool:
    """Whether `pid` is still alive `timeout` seconds on: a child the kernel kills as its parent exits
    (PR_SET_PDEATHSIG) may take a moment to go."""
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pid)


def uses(pid: int, directory: Path) -> bool:
    """Whether `pid` has a file under `directory` open or mapped: it is past its start-up, at work."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
        fds = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return False
    return str(directory) in maps or any(fd.startswith(str(directory)) for fd in fds)


def freeze(pid: int, timeout: float = 10) -> None:
    """SIGSTOP `pid` and wait until the stop has taken hold (state T), or it has died."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = stat_fields(pid)
        if fields is None or fields[0] in ("T", "Z"):
            return
        time.sleep(0.0005)
    raise AssertionError(f"{pid} did not stop")


def stop_child_at_work(proc: subprocess.Popen, module: str, working_in: Path, timeout: float = 120) -> int:
    """The child running `module`, frozen (SIGSTOP) once it has a file under `working_in` open: past its
    start-up (a child stopped before it asks to die with its parent would outlive the build, as no child that
    runs does) and mid-step.

    A tiny model's step can be over between two looks at /proc, so the child, once seen, only runs in slices
    of a millisecond and is stopped while it is looked at: it cannot finish unseen.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the build ended ({proc.returncode}) before {module} was seen at work"
        for pid in children_running(proc.pid, module):
            freeze(pid)
            while alive(pid) and not uses(pid, working_in) and time.monotonic() < deadline:
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.001)
                freeze(pid)
            if alive(pid) and uses(pid, working_in):
                return pid
        time.sleep(0.002)
    raise AssertionError(f"{module} was never seen at work")


@pytest.fixture
def cache_without(built_demo, tmp_path):
    """A copy of the built demo cache without the given stages' artifacts."""
    _, built = built_demo

    def make(*stages: str) -> Path:
        cache = tmp_path / "cache"
        shutil.copytree(built, cache, symlinks=True)
        for stage in stages:
            shutil.rmtree(cache / "objects" / stage)
        return cache

    return make


@contextmanager
def ended(proc: subprocess.Popen) -> Iterator[None]:
    """However the test goes, the build and what it started are gone after it."""
    try:
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def start_build(manifest: Path, cache: Path, tmp: Path, *, sigint_ignored: bool = False) -> subprocess.Popen:
    tmp.mkdir()
    command = [sys.executable, "-m", "so8t_deploy", "build", str(manifest), "--cache-dir", str(cache)]
    # An ignored SIGINT is inherited through exec: how a shell script starts a job in the background.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None
    try:
        # A session of its own, as a terminal's job is: a Ctrl-C reaches every process in the group.
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)})
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def one_variant(tmp_path: Path, demo_dir: Path) -> Path:
    """The demo manifest with one variant (the built demo's `full`, cached up to its GGUF): one quantizer."""
    return write_demo_manifest(tmp_path / "m.yaml", demo_dir, [], variants="{full: {}}")


def published(cache: Path, stage: str) -> list[str]:
    """A stage's artifacts that a later run would trust: not the hidden staging of a killed writer."""
    directory = cache / "objects" / stage
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) if directory.exists() else []


def signal_thread(pid: int, tid: int, signum: int) -> None:
    """tgkill(2): a signal for one thread of another process, as the kernel may choose to deliver it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_TGKILL, pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid})")


@pytest.mark.parametrize("receiver", ["process group", "another thread", "a job started with SIGINT ignored"])
def test_ctrl_c_during_quantize_exits_130_and_publishes_nothing(built_demo, cache_without, tmp_path, receiver):
    demo_dir, _ = built_demo
    cache = cache_without("quantize")
    proc = start_build(one_variant(tmp_path, demo_dir), cache, tmp_path / "tmp",
                       sigint_ignored=receiver.endswith("ignored"))
    with ended(proc):
        quantizer = stop_child_at_work(proc, "so8t_deploy.external.quantize_runner", cache / "objects")
        if receiver != "another thread":
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
        else:
            # A process-wide signal goes to whichever thread the kernel picks (the build has a few, from
            # torch and the digest pool); one taken by a thread other than the main must work as well.
            threads = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
            signal_thread(proc.pid, threads[-1], signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted; nothing partial was kept"
    assert "Traceback" not in err
    assert not outlived(quantizer)
    assert published(cache, "quantize") == []
    assert [p.name for p in (cache / "objects").rglob("*.partial*")] == []


def test_sigterm_during_quantize_is_an_interrupt_too(built_demo, cache_without, tmp_path):
    demo_dir, _ = built_demo
    cache = cache_without("quantize")
    proc = start_build(one_variant(tmp_path, demo_dir), cache, tmp_path / "tmp")
    with ended(proc):
        quantizer = stop_child_at_work(proc, "so8t_deploy.external.quantize_runner", cache / "objects")
        proc.send_signal(signal.SIGTERM)  # only the build: a CI runner cancelling the job
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted; nothing partial was kept"
    assert not outlived(quantizer)
    assert published(cache, "quantize") == []


def test_a_killed_build_leaves_no_converter_running_and_no_temp_file(built_demo, cache_without, tmp_path):
    demo_dir, _ = built_demo
    cache = cache_without("convert", "quantize")
    manifest = write_demo_manifest(tmp_path / "m.yaml", demo_dir, [])
    proc = start_build(manifest, cache, tmp_path / "tmp")
    # Frozen once it is reading the baked model: mid-conversion, when its parent dies.
    with ended(proc):
        converter = stop_child_at_work(proc, "so8t_deploy.external.convert_runner", cache / "objects")
        proc.kill()
        proc.communicate(timeout=60)
    assert not outlived(converter), "the converter outlived the build that started it"
    assert list((tmp_path / "tmp").iterdir()) == []
    # The frozen conversion was not published; one that finished before it (the other variant) may be, whole.
    assert len(published(cache, "convert")) < 2
    for key in published(cache, "convert"):
        record, damage = Workspace(cache).inspect("convert", key)
        assert record is not None and damage is None

    # The next run clears what the dead one was writing and converges.
    rerun = subprocess.run([sys.executable, "-m", "so8t_deploy", "build", str(manifest), "--cache-dir", str(cache)],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(published(cache, "convert")) == 2 and len(published(cache, "quantize")) == 2
    assert [p.name for p in (cache / "objects").rglob("*.partial*")] == []
