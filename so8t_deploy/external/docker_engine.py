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
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from ..errors import BuildError

DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "Dockerfile"


def _client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as e:
        where = os.environ.get("DOCKER_HOST", "the local socket")
        raise BuildError(f"runtime.backend: docker: no Docker engine at {where} ({e})") from e


def _gpu_requests(gpus: str | int):
    if gpus == "none":
        return []
    from docker.types import DeviceRequest

    return [DeviceRequest(count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]])]


class ContainerStep:
    """Run one worker command in a container and wait for it."""

    def __init__(self, image: str, gpus: str | int, timeout_s: float, label: str):
        self.image, self.gpus, self.timeout_s, self.label = image, gpus, timeout_s, label

    def run(self, args: list[str], read_only: Iterable[Path] = (), read_write: Iterable[Path] = ()) -> list[str]:
        """Run the worker with `args`; return its output lines, or raise BuildError with the last ones."""
        import docker

        client = _client()
        volumes = {str(p): {"bind": str(p), "mode": "ro"} for p in read_only}
        volumes |= {str(p): {"bind": str(p), "mode": "rw"} for p in read_write}
        container = None
        lines: list[str] = []
        try:
            # create, then start: a start that fails (no GPU runtime) still leaves a container to remove
            container = client.containers.create(
                self.image, args, network_mode="none", user=f"{os.getuid()}:{os.getgid()}",
                volumes=volumes, device_requests=_gpu_requests(self.gpus), labels={"so8t-deploy": self.label})
            container.start()
            streamer = threading.Thread(target=self._stream_logs, args=(container, lines), daemon=True)
            streamer.start()
            try:
                status = container.wait(timeout=self.timeout_s)
            except Exception as e:  # requests' ReadTimeout, ConnectionError: the wait itself ended
                raise BuildError(f"{self.label}: no result within {self.timeout_s:g} s ({type(e).__name__}); "
                                 "the container was stopped") from e
            streamer.join(timeout=5)
            code = status.get("StatusCode", -1)
            if code != 0:
                reason = "killed" if code in (137, 143) else f"exit {code}"
                raise BuildError(f"{self.label}: worker container failed ({reason}): "
                                 f"{' | '.join(line.strip() for line in lines[-3:])}")
            return lines
        except docker.errors.ImageNotFound as e:
            raise BuildError(f"runtime.image: {self.image} not found; build it with `so8t-deploy image build`") from e
        except docker.errors.APIError as e:
            if self.gpus != "none" and "gpu" in str(e).lower():
                raise BuildError(f"runtime.gpus: {self.gpus!r}, but the Docker engine has no GPU runtime "
                                 "(install the NVIDIA container toolkit, or set gpus: none)") from e
            raise BuildError(f"{self.label}: Docker engine error: {e.explanation or e}") from e
        finally:
            if container is not None:
                with contextlib.suppress(docker.errors.APIError):  # already gone is fine
                    container.remove(force=True)

    def _stream_logs(self, container, lines: list[str]) -> None:
        buffer = b""
        for chunk in container.logs(stream=True, follow=True):
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                text = line.decode(errors="replace").rstrip()
                lines.append(text)
                print(f"[{self.label}] {text}", file=sys.stderr, flush=True)


def build_image(tag: str, wheelhouse: Path, build_args: dict[str, str], dockerfile: Path = DOCKERFILE) -> None:
    """Build the worker image from docker/Dockerfile and a wheelhouse, streaming the build log."""
    import docker

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
                            print(f"[image] {line}", file=sys.stderr, flush=True)
                if "error" in event:
                    detail = event["error"].strip().splitlines()[-1][-300:]
                    raise BuildError(f"image build failed: {detail} (the build log above has the rest)")
        except docker.errors.APIError as e:
            raise BuildError(f"image build failed: {e.explanation or e}") from e


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
