"""A virtual environment with so8t-deploy and its base dependencies only: the control machine of a
`backend: docker` deployment, where torch is not installed.

It is installed offline (pip --no-index, and no pip configuration, so nothing is fetched): the
wheel of the source as it is now, and the base dependencies from a wheelhouse, either the one
`make wheelhouse` writes (every wheel of the worker image, a superset) or, without it, one
downloaded once, at the versions installed here, into .cache/control-wheels/<pyproject digest>/.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_WHEELHOUSE = REPO / ".cache" / "wheelhouse"
COMPLETE = ".complete"


def isolated_env(**extra: str) -> dict[str, str]:
    """This process's environment without Python's and pip's settings (no PYTHONPATH, no pip.conf)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"} | extra


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command[:6]))} ... failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
    return proc


def project_wheel(out: Path) -> Path:
    """The so8t-deploy wheel of the current source, built from a copy: an in-tree build/ keeps removed modules."""
    source = out / "source"
    shutil.copytree(REPO / "so8t_deploy", source / "so8t_deploy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    try:  # offline with this interpreter's setuptools; else pip's isolated build fetches one
        isolation = ["--no-build-isolation"] if int(importlib.metadata.version("setuptools").split(".")[0]) >= 68 \
            else []
    except importlib.metadata.PackageNotFoundError:
        isolation = []
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", out, source])
    return next(out.glob("so8t_deploy-*.whl"))


def downloaded_wheelhouse() -> Path:
    """The base dependencies' wheels at this interpreter's versions, downloaded once per pyproject.toml."""
    pyproject = (REPO / "pyproject.toml").read_bytes()
    target = REPO / ".cache" / "control-wheels" / hashlib.sha256(pyproject).hexdigest()[:16]
    if (target / COMPLETE).is_file():
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    pins = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"] and "+" not in d.version}
    pins.pop("so8t-deploy", None)
    (staging / "constraints.txt").write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    dependencies = tomllib.loads(pyproject.decode())["project"]["dependencies"]
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", staging,
          "-c", staging / "constraints.txt", *dependencies])
    (staging / COMPLETE).touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def make_control_venv(root: Path) -> Path:
    """A venv under root with so8t-deploy (no extras) installed offline; returns its bin/ directory."""
    wheel = project_wheel(root / "wheel")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], env=isolated_env())
    errors = []
    wheelhouses = [IMAGE_WHEELHOUSE] if any(IMAGE_WHEELHOUSE.glob("so8t_deploy-*.whl")) else []
    for wheelhouse in [*wheelhouses, None]:  # None: download one (once) when the image's lacks something
        wheelhouse = wheelhouse or downloaded_wheelhouse()
        proc = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--find-links",
                               wheelhouse, wheel], capture_output=True, text=True, env=isolated_env())
        if proc.returncode == 0:
            return venv / "bin"
        errors.append(f"{wheelhouse}: {proc.stderr.strip()[-1000:]}")
    raise RuntimeError("cannot install so8t-deploy offline into the control venv:\n" + "\n".join(errors))
