"""Build the llama-cpp-python wheel once per user, with a heartbeat: what `make` runs before installing it.

    python scripts/build_llama_wheel.py SDIST OUT_DIR

llama.cpp compiles for minutes and `pip wheel` prints nothing meanwhile, so this prints a line at least every
HEARTBEAT_S seconds: the minutes so far, the expected total, and the compile's own progress from the log.
On failure it prints the end of the log. OUT_DIR is a cache that `make clean` leaves alone (the Makefile names
it after the version and the CMAKE_ARGS); the wheel is published there atomically, `.complete` written last.
"""

from __future__ import annotations

import fcntl
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEARTBEAT_S = float(os.environ.get("SO8T_BUILD_HEARTBEAT_S", "30"))
# Measured (README, "The first hour"): a cold build of 0.3.36 with the Makefile's CMAKE_ARGS, build dependencies
# included, took 16 CPU-minutes.
CORE_MINUTES = 16.0
# The compile's own progress: ninja's "[14/140] …" or make's "[ 42%] …" lines in the log.
STEP_PROGRESS = re.compile(r"^\s*\[(?:(\d+)/(\d+)|\s*(\d+)%)\]\s+(.*)$")


def estimate_minutes(cores: int) -> int:
    return max(1, round(CORE_MINUTES / max(1, cores)))


def compile_progress(log: Path) -> str:
    """The compile's last progress line in the build log, shortened ("14/140 compiled, ggml-cpu.c");
    "" until the compile starts."""
    try:
        tail = log.read_bytes()[-50000:].decode(errors="replace")
    except OSError:
        return ""
    matches = [m for m in map(STEP_PROGRESS.match, tail.splitlines()) if m]
    if not matches:
        return ""
    done, total, percent, what = matches[-1].groups()
    step = f"{done}/{total} steps" if done else f"{percent}%"
    last = what.split()[-1].rsplit("/", 1)[-1] if what.split() else ""  # the source (ninja) or target (make)
    return f"{step} done, last: {last}"


def heartbeat(elapsed_s: float, cores: int, progress: str) -> str:
    minutes, expected = round(elapsed_s / 60), estimate_minutes(cores)
    line = f"still building llama.cpp ({minutes} min so far; " + (
        f"about {expected} min in all on {cores} cores)" if minutes < expected
        else f"expected about {expected} min on {cores} idle cores: this machine is busy or slower)")
    return f"{line}; {progress}" if progress else line


def build(sdist: Path, out_dir: Path, pip: tuple[str, ...] = (sys.executable, "-m", "pip")) -> int:
    """Build the wheel from sdist into out_dir (staged next to it), printing a heartbeat; 0 when built."""
    cores = os.cpu_count() or 1
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    log = staging / "build.log"
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(cores))}
    # -v: the backend's output, the compile's progress lines included, goes to the log. No --no-binary: the
    # build dependencies (scikit-build-core, and cmake where the system has none) come as wheels.
    command = [*pip, "--disable-pip-version-check", "wheel", "-v", "--no-deps", "--no-cache-dir",
               "-w", str(staging), str(sdist)]
    print(f"building llama.cpp from {sdist.name} (CMAKE_ARGS={env.get('CMAKE_ARGS', '')!r}): once per user, "
          f"about {estimate_minutes(cores)} min on {cores} idle cores; log: {log}", flush=True)
    start = time.monotonic()
    try:
        code = run_with_heartbeat(command, env, log, cores)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    wheels = list(staging.glob("llama_cpp_python-*.whl"))
    if code != 0 or len(wheels) != 1:
        kept = out_dir.parent / f"{out_dir.name}.failed.log"
        shutil.copy(log, kept)
        shutil.rmtree(staging, ignore_errors=True)
        tail = kept.read_text(errors="replace").splitlines()[-40:]
        print("\n".join(["llama.cpp build failed; the end of its log:", *tail, f"whole log: {kept}"]),
              file=sys.stderr)
        return code or 1
    publish(staging, out_dir)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the compilers' time too: each level waited for its own
    print(f"built {wheels[0].name} in {(time.monotonic() - start) / 60:.1f} min "
          f"({(usage.ru_utime + usage.ru_stime) / 60:.1f} CPU-min); cached in {out_dir}", flush=True)
    return 0


def run_with_heartbeat(command: list[str], env: dict[str, str], log: Path, cores: int) -> int:
    start = time.monotonic()
    with log.open("wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    return proc.wait(HEARTBEAT_S)
                except subprocess.TimeoutExpired:
                    print(f"  {heartbeat(time.monotonic() - start, cores, compile_progress(log))}", flush=True)
        finally:
            if proc.poll() is None:  # interrupted
                proc.terminate()
                proc.wait()


def publish(staging: Path, out_dir: Path) -> None:
    (staging / ".complete").touch()
    if out_dir.exists():  # an unfinished or older copy: "the directory exists" never means done
        shutil.rmtree(out_dir)
    os.rename(staging, out_dir)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    sdist, out_dir = Path(argv[0]), Path(argv[1])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with (out_dir.parent / f".{out_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two clones building at once: the second waits, then finds it cached
        if (out_dir / ".complete").is_file():
            print(f"llama.cpp wheel: cached in {out_dir}")
            return 0
        return build(sdist, out_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
