"""Where a worker step runs: in this process, or in a fresh worker container.

Both runners execute the same typed steps (build/steps.py) and must produce the same bytes; the
pipeline does the caching, locking and atomic publication around them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Protocol, TypeVar, cast

from pydantic import BaseModel, ValidationError

from ..errors import BuildError
from ..manifest.schema import Manifest
from ..progress import Progress
from ..store.workspace import Workspace
from .steps import Step, StepEnvelope, WorkerStep

R = TypeVar("R", bound=BaseModel)


class Runner(Protocol):
    name: str

    def run(self, step: Step[R]) -> R:
        """Execute one step and return its result."""
        ...


def runner_for(manifest: Manifest, workspace: Workspace, progress: Progress) -> Runner:
    """The runner that the manifest's runtime.backend names."""
    if manifest.runtime.backend == "docker":
        return DockerRunner(manifest.runtime.image, manifest.runtime.gpus, manifest.runtime.timeout_s, workspace,
                            progress)
    return LocalRunner(workspace, progress)


class LocalRunner:
    """The embedded default: every step in this process (the converter in a child Python)."""

    name = "local"

    def __init__(self, workspace: Workspace, progress: Progress):
        self.workspace, self.progress = workspace, progress

    def run(self, step: Step[R]) -> R:
        from .worker import execute

        return step.result(execute(_worker_step(step), self.progress, converter_root=self.workspace.converter))


class DockerRunner:
    """Each step in a fresh worker container (docker/Dockerfile), driven through the docker SDK.

    The contract with the container: the step's envelope (build/steps.py) is written as JSON into a
    scratch directory of the workspace; the workspace is mounted read-write at its own path, and
    every input outside it read-only at its own path, so no path in the spec needs translating; the
    container runs `so8t-deploy worker run SPEC` as the calling user and writes the step's result
    to the envelope's result_file. Spec, result and scratch directory are removed however it ends.
    """

    name = "docker"

    def __init__(self, image: str, gpus: str | int, timeout_s: float, workspace: Workspace, progress: Progress):
        self.image, self.gpus, self.timeout_s = image, gpus, timeout_s
        self.workspace, self.progress = workspace, progress
        self._image_checked = False

    def run(self, step: Step[R]) -> R:
        from ..external.docker_engine import ContainerStep, check_image_pin

        if not self._image_checked:
            check_image_pin(self.image)
            self._image_checked = True
        scratch = self.workspace.scratch("steps")
        step_dir = scratch / f"{step.kind}-{uuid.uuid4().hex[:12]}"
        try:
            step_dir.mkdir()
            spec = step_dir / "spec.json"
            envelope = StepEnvelope(step=_worker_step(step), result_file=step_dir / "result.json")
            spec.write_text(envelope.model_dump_json(), encoding="utf-8")
            read_only, read_write = self._mounts(step)
            container = ContainerStep(self.image, self.gpus, self.timeout_s, step.kind, self.progress)
            container.run(["run", str(spec)], read_only=read_only, read_write=[self.workspace.root, *read_write])
            return self._result(step, envelope.result_file)
        finally:
            shutil.rmtree(step_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # another step of this process may be using it
                scratch.rmdir()

    def _mounts(self, step: Step[R]) -> tuple[list[Path], list[Path]]:
        """The step's paths that the workspace's own mount does not cover (compared as spelled: the
        worker sees each path exactly as the spec names it)."""
        read_only, read_write = step.mounts()
        outside = [p for p in read_only if not p.absolute().is_relative_to(self.workspace.root)]
        writable = [p for p in read_write if not p.absolute().is_relative_to(self.workspace.root)]
        for path in writable:
            path.mkdir(parents=True, exist_ok=True)  # here, as the caller, not by the engine as root
        return outside, writable

    def _result(self, step: Step[R], result_file: Path) -> R:
        try:
            return step.result(json.loads(result_file.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise BuildError(f"{step.kind}: the worker container exited without writing its result; is "
                             f"runtime.image {self.image} a so8t-deploy worker image?") from None
        except (ValueError, ValidationError) as e:
            raise BuildError(f"{step.kind}: the worker's result is not a {step.result_model.__name__} "
                             f"({str(e).splitlines()[0]}); does {self.image} run this so8t-deploy version?") from e


def _worker_step(step: Step[R]) -> WorkerStep:
    """`step` as one of the kinds a worker runs (a Step is one of them by construction)."""
    return cast(WorkerStep, step)
