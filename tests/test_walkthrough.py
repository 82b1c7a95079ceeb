"""The README's by-hand walk-through ("The first hour"), run as written against `make demo-hosts`'s hosts.

The commands come from the README itself (the sh block after the WALKTHROUGH marker), typed into one bash line
after line; a line whose comment says `exit N` must exit N, every other line 0. As in the README, `make demo`
has run first. The hosts run as `make demo-hosts` runs them, in a scratch copy of the repository's layout, on two
free ports (OLLAMA_HOST_A/B, which the demo hosts and the manifest both read), and stop on SIGINT as on Ctrl-C
in a terminal: exit 0, nothing left listening or running.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gotemplate import ensure_binary

from .conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

WALKTHROUGH = "<!-- tests/test_walkthrough.py runs the next block -->"
HOSTS_COMMAND = "$(PY) -m tests.demo_hosts --serve"


def readme_walkthrough() -> list[tuple[str, int]]:
    """(command line, expected exit code) for every line of the README's walk-through block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert WALKTHROUGH in text, f"README.md has no {WALKTHROUGH!r} marker"
    block = re.search(r"```sh\n(.*?)```", text[text.index(WALKTHROUGH):], re.S)
    assert block, "no sh block after the walk-through marker"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    return [(line, int(m.group(1)) if (m := re.search(r"#.*\bexit (\d+)", line)) else 0) for line in lines]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def no_process_left(group: int, wait_s: float = 10) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_readme_walkthrough_block_is_what_this_test_runs():
    commands = [line for line, _ in readme_walkthrough()]
    assert commands[0] == ". .venv/bin/activate"
    assert any(re.match(r"so8t-deploy apply manifests/\S+\.yaml", c) for c in commands)
    assert readme_walkthrough()[-1][1] == 0 and "--check" in commands[-1]
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo-hosts:.*\n(?:demo-hosts:.*\n)*\t" + re.escape(HOSTS_COMMAND) + "$", makefile, re.M), \
        "`make demo-hosts` no longer runs what this test starts"


@pytest.fixture
def scratch_repo(tmp_path):
    """The layout the walk-through expects at the repository root: manifests/, .so8t/demo (what `make demo-hosts`
    writes first) and .venv (this interpreter's environment)."""
    from so8t_deploy.demo import init_demo

    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    init_demo(tmp_path / ".so8t" / "demo")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    return tmp_path


def run_in_one_shell(commands: list[str], cwd: Path, env: dict[str, str]) -> list[tuple[int, float, str]]:
    """Run the lines one after the other in one bash, as typed into a terminal (`. .venv/bin/activate` holds for
    the lines after it); (exit code, seconds, output) per line."""
    rc_file = cwd / ".walkthrough-exit-codes"
    script = "".join(f'echo "@@@ {i}"\n{line}\necho "$? $(date +%s.%N)" >> {rc_file}\n'
                     for i, line in enumerate(commands))
    start = time.time()
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    outputs = re.split(r"^@@@ \d+\n", done.stdout, flags=re.M)[1:]
    results = []
    for line, output in zip(rc_file.read_text().splitlines(), outputs, strict=True):
        code, at = line.split()
        results.append((int(code), float(at) - start, output))
        start = float(at)
    return results


def test_by_hand_walkthrough_against_demo_hosts(scratch_repo):
    ensure_binary()  # without Go: a skip (conftest), not a host that dies at start
    ports = [free_port(), free_port()]
    env = {**os.environ, "OLLAMA_HOST_A": f"http://127.0.0.1:{ports[0]}",
           "OLLAMA_HOST_B": f"http://127.0.0.1:{ports[1]}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    venv_bin = scratch_repo / ".venv" / "bin"
    hosts = subprocess.Popen([sys.executable, "-m", "tests.demo_hosts", "--serve"], cwd=scratch_repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        banner = []
        for line in hosts.stdout:
            banner.append(line)
            if line.startswith("demo hosts up"):
                break
        assert hosts.poll() is None, "".join(banner)
        # What `make demo` runs; with `make demo-hosts` up it deploys to those hosts.
        demo = subprocess.run([sys.executable, "-m", "tests.demo_hosts", str(venv_bin / "so8t-deploy"), "apply",
                               "manifests/demo.yaml"], cwd=scratch_repo, env=env, capture_output=True, text=True)
        assert demo.returncode == 0 and "demo hosts already up" in demo.stdout, demo.stdout + demo.stderr
        walkthrough = readme_walkthrough()
        results = run_in_one_shell([command for command, _ in walkthrough], scratch_repo, env)
        for (command, expected), (code, seconds, output) in zip(walkthrough, results, strict=True):
            print(f"{seconds:5.1f} s  exit {code}  {command}")
            assert code == expected, f"{command}\n{output}"
    finally:
        os.killpg(hosts.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the whole foreground group
        try:
            code = hosts.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(hosts.pid, signal.SIGKILL)
            raise
        tail = hosts.stdout.read()
        hosts.stdout.close()
    assert code == 0, tail
    assert "demo hosts stopped" in tail
    assert not any(listening(port) for port in ports)
    assert no_process_left(hosts.pid), "a demo host (or its Go helper) outlived Ctrl-C"
    assert (scratch_repo / ".so8t" / "demo-hosts" / "host-a" / "manifests").is_dir()  # the stores persist
