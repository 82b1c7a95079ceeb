"""The Docker engine, through the docker SDK: the worker image and the containers that run build steps.

A step runs in a fresh container from the worker image: inputs bind-mounted read-only and the
artifact cache read-write (each at its own absolute path, so arguments need no translation), no
network, the calling user's uid/gid (artifacts on the host are not root's), a timeout, logs
streamed with a prefix, and the container removed however the step ends. `docker.from_env()`
honours DOCKER_HOST, so a remote GPU builder works when the paths exist there too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..cancel import leave_interrupts_to_the_main_thread
from ..errors import BuildError
from ..progress import SILENT, Progress

if TYPE_CHECKING:  # the docker SDK (untyped) is imported where it is used
    from docker.client import DockerClient
    from docker.errors import APIError
    from docker.models.containers import Container
    from docker.types import DeviceRequest, Mount

DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "Dockerfile"
LLAMA_LABEL = "org.so8t-deploy.llama-cpp-python"  # set by the Dockerfile from the pinned version


def _client() -> DockerClient:
    import docker.errors  # binds `docker` too

    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as e:
        where = os.environ.get("DOCKER_HOST", "the local socket")
        raise BuildError(f"runtime.backend: docker: no Docker engine at {where} ({e})") from e


def _gpu_requests(gpus: str | int) -> list[DeviceRequest]:
    if gpus == "none":
        return []
    from docker.types import DeviceRequest

    return [DeviceRequest(count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]])]


def check_image_pin(image: str) -> None:
    """Refuse a worker image built with another llama.cpp than the one this so8t-deploy is pinned to."""
    import docker.errors  # binds `docker` too

    from .llamacpp import LLAMA_CPP_PYTHON_VERSION

    try:
        labels = _client().images.get(image).labels or {}
    except docker.errors.ImageNotFound as e:
        raise BuildError(f"runtime.image: {image} not found; build it with `so8t-deploy image build`") from e
    except docker.errors.APIError as e:
        raise BuildError(f"runtime.image: cannot inspect {image}: {_explain(e)}") from e
    found = labels.get(LLAMA_LABEL)
    if found != LLAMA_CPP_PYTHON_VERSION:
        raise BuildError(f"runtime.image: {image} carries llama-cpp-python {found or '(no label)'}, but this "
                         f"so8t-deploy is pinned to {LLAMA_CPP_PYTHON_VERSION}; rebuild it with "
                         "`so8t-deploy image build`")


class ContainerStep:
    """Run one worker command in a container and wait for it."""

    def __init__(self, image: str, gpus: str | int, timeout_s: float, label: str, progress: Progress = SILENT):
        self.image, self.gpus, self.timeout_s, self.label = image, gpus, timeout_s, label
        self.progress = progress

    def run(self, args: list[str], read_only: Iterable[Path] = (), read_write: Iterable[Path] = ()) -> list[str]:
        """Run the worker with `args`; return its output lines, or raise BuildError with the last ones.

        Each path is bind-mounted at itself (absolute, as the worker will be told it), from where it
        really is on this machine; every one must exist.
        """
        import docker.errors  # binds `docker` too

        client = _client()
        mounts = _bind_mounts(read_only, read_write)
        container = None
        lines: list[str] = []
        try:
            # create, then start: a start that fails (no GPU runtime) still leaves a container to remove
            container = client.containers.create(
                self.image, args, network_mode="none", user=f"{os.getuid()}:{os.getgid()}", mounts=mounts,
                device_requests=_gpu_requests(self.gpus), labels={"so8t-deploy": self.label})
            container.start()
            streamer = threading.Thread(target=self._stream_logs, args=(container, lines), daemon=True)
            streamer.start()
            code = self._wait(container)
            streamer.join(timeout=5)
            if code != 0:
                raise BuildError(f"{self.label}: worker container failed ({self._reason(container, code)})"
                                 + _last_lines(container, lines))
            return lines
        except docker.errors.ImageNotFound as e:
            raise BuildError(f"runtime.image: {self.image} not found; build it with `so8t-deploy image build`") from e
        except docker.errors.APIError as e:
            if self.gpus != "none" and "gpu" in str(e).lower():
                raise BuildError(f"runtime.gpus: {self.gpus!r}, but the Docker engine has no GPU runtime "
                                 "(install the NVIDIA container toolkit, or set gpus: none)") from e
            raise BuildError(f"{self.label}: Docker engine error: {_explain(e)}") from e
        finally:
            if container is not None:
                with contextlib.suppress(docker.errors.APIError):  # already gone is fine
                    container.remove(force=True)

    def _wait(self, container: Container) -> int:
        import requests

        try:
            code: int = container.wait(timeout=self.timeout_s).get("StatusCode", -1)
            return code
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as e:
            raise BuildError(f"{self.label}: no result within {self.timeout_s:g} s (runtime.timeout_s); "
                             "the container was stopped") from e

    @staticmethod
    def _reason(container: Container, code: int) -> str:
        import docker.errors  # binds `docker` too

        with contextlib.suppress(docker.errors.APIError):
            container.reload()
            if container.attrs.get("State", {}).get("OOMKilled"):
                return "killed: out of memory"
        return "killed" if code in (137, 143) else f"exit {code}"

    def _stream_logs(self, container: Container, lines: list[str]) -> None:
        import docker.errors  # binds `docker` too

        leave_interrupts_to_the_main_thread()  # it waits on the container, and must hear a Ctrl-C
        buffer = b""
        with contextlib.suppress(docker.errors.APIError):  # the container was removed under us
            for chunk in container.logs(stream=True, follow=True):
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    self._line(line, lines)
        if buffer:
            self._line(buffer, lines)

    def _line(self, raw: bytes, lines: list[str]) -> None:
        text = raw.decode(errors="replace").rstrip()
        lines.append(text)
        self.progress.step(f"[{self.label}] {text.removeprefix('> ')}")  # the worker marks its own step lines


def _bind_mounts(read_only: Iterable[Path], read_write: Iterable[Path]) -> list[Mount]:
    """Mounts for the paths, each at itself; a path below another of the same or a stronger mode is covered by it.

    A read-only input's files that are links out of it (a Hugging Face cache snapshot links into
    ../../blobs) get their targets' directories mounted too, so the links resolve in the container.
    """
    from docker.types import Mount

    wanted = {Path(p).absolute(): False for p in read_only}
    wanted |= {p: False for p in _link_targets(list(wanted)) if p not in wanted}
    wanted |= {Path(p).absolute(): True for p in read_write}
    mounts = []
    for target, writable in sorted(wanted.items()):
        if any(target != other and target.is_relative_to(other) and (wanted[other] or not writable)
               for other in wanted):
            continue
        if not target.exists():
            raise BuildError(f"cannot mount {target} into the worker container: it does not exist")
        mounts.append(Mount(str(target), str(target.resolve()), type="bind", read_only=not writable))
    return mounts


def _link_targets(roots: list[Path]) -> set[Path]:
    """The directories that links below `roots` point into, where those lie outside every root."""
    found = set()
    for root in roots:
        links = [p for p in root.rglob("*") if p.is_symlink()] if root.is_dir() else []
        for link in links:
            target = link.resolve()
            if not any(target.is_relative_to(r.resolve()) for r in roots):
                found.add(target if target.is_dir() else target.parent)
    return found


def _last_lines(container: Container, streamed: list[str], n: int = 3) -> str:
    """': ' and the worker's last log lines, read back from the engine (the stream may still lag behind)."""
    import docker.errors  # binds `docker` too

    try:
        text = container.logs(stdout=True, stderr=True, tail=50).decode(errors="replace")
        lines = text.splitlines()
    except docker.errors.APIError:
        lines = streamed
    last = [line.strip() for line in lines if line.strip()][-n:]
    return f": {' | '.join(last)}" if last else ""


def _explain(e: APIError) -> str:
    return str(e.explanation or e).strip().splitlines()[0]


def build_image(tag: str, wheelhouse: Path, build_args: dict[str, str], progress: Progress = SILENT,
                dockerfile: Path = DOCKERFILE) -> None:
    """Build the worker image from docker/Dockerfile and a wheelhouse, streaming the build log.

    The pinned llama-cpp-python version goes in as a build argument: the Dockerfile checks that the
    wheelhouse installs exactly it and labels the image with it (see check_image_pin).
    """
    import docker.errors  # binds `docker` too

    from .llamacpp import LLAMA_CPP_PYTHON_VERSION

    build_args = {**build_args, "LLAMA_CPP_PYTHON_VERSION": LLAMA_CPP_PYTHON_VERSION}

    if not dockerfile.is_file():
        raise BuildError(f"{dockerfile}: not found; build the image from a so8t-deploy source checkout")
    if not wheelhouse.is_dir() or not any(wheelhouse.glob("so8t_deploy-*.whl")):
        raise BuildError(f"{wheelhouse}: not a wheelhouse with an so8t_deploy wheel (see `make wheelhouse`)")
    client = _client()
    with tempfile.TemporaryDirectory(prefix="so8t-image-") as tmp:
        context = Path(tmp)
        shutil.copy2(dockerfile, context / "Dockerfile")
        shutil.copytree(wheelhouse, context / "wheels", copy_function=_link_or_copy)
        try:
            for event in client.api.build(path=str(context), tag=tag, buildargs=build_args, decode=True, rm=True,
                                          forcerm=True, network_mode="host", pull=False):
                if "stream" in event:
                    for line in event["stream"].splitlines():
                        if line.strip():
                            progress.step(f"[image] {line}")
                if "error" in event:
                    detail = event["error"].strip().splitlines()[-1][-300:]
                    raise BuildError(f"image build failed: {detail} (the build log above has the rest)")
        except docker.errors.APIError as e:
            raise BuildError(f"image build failed: {_explain(e)}") from e


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
