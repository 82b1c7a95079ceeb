"""Where the heavy steps (bake, convert, quantize) run: in this process, or in a worker container.

Both runners take the same artifact paths and must produce the same bytes; the build
orchestrator does the caching and atomic publication around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from .cache import DIGEST_FILE
from .manifest import Manifest, Scales
from .quant_types import QuantType


class Runner(Protocol):
    name: str

    def bake(self, model_dir: Path, adapters: Sequence[tuple[str, Path, bool]], out_dir: Path, scales: Scales,
             dtype: str) -> None: ...

    def convert(self, baked_dir: Path, out_file: Path, outtype: str, metadata: dict[str, str]) -> None: ...

    def quantize(self, in_file: Path, out_file: Path, quant: QuantType) -> None: ...

    def llama_cpp_version(self) -> str: ...


def runner_for(manifest: Manifest, cache_dir: Path) -> Runner:
    """The runner that the manifest's runtime.backend names."""
    if manifest.runtime.backend == "docker":
        return DockerRunner(manifest.runtime.image, manifest.runtime.gpus, manifest.runtime.timeout_s, cache_dir)
    return LocalRunner(digest_file=cache_dir / DIGEST_FILE)


class LocalRunner:
    """The embedded default: everything in-process (the converter in a child Python)."""

    name = "local"

    def __init__(self, digest_file: Path | None = None):
        self._digest_file = digest_file

    def bake(self, model_dir, adapters, out_dir, scales, dtype) -> None:
        from .bake.bake import bake_model
        from .console import byte_progress
        from .hashing import DigestCache

        digests = DigestCache(self._digest_file) if self._digest_file else None
        with byte_progress(f"bake {out_dir.parent.name[:12]}") as advance:
            bake_model(model_dir, list(adapters), out_dir, scales, dtype, advance, digests)

    def convert(self, baked_dir, out_file, outtype, metadata) -> None:
        from .external.llamacpp import convert_to_gguf, locate_converter

        convert_to_gguf(locate_converter(), baked_dir, out_file, outtype, metadata)

    def quantize(self, in_file, out_file, quant) -> None:
        from .external.llamacpp import quantize_gguf

        quantize_gguf(in_file, out_file, quant)

    def llama_cpp_version(self) -> str:
        from .external.llamacpp import library_version, locate_converter

        library_version()
        return locate_converter().version


class DockerRunner:
    """Each step in a fresh worker container (docker/Dockerfile), driven through the docker SDK."""

    name = "docker"

    def __init__(self, image: str, gpus: str | int, timeout_s: float, cache_dir: Path):
        self.image, self.gpus, self.timeout_s = image, gpus, timeout_s
        self.cache_dir = cache_dir.resolve()
        self._version: str | None = None

    def _run(self, label: str, args: list[str], read_only=()) -> list[str]:
        from .external.docker_engine import ContainerStep

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        step = ContainerStep(self.image, self.gpus, self.timeout_s, label)
        return step.run(args, read_only=[Path(p).resolve() for p in read_only], read_write=[self.cache_dir])

    def bake(self, model_dir, adapters, out_dir, scales, dtype) -> None:
        scale_arg = ",".join(f"{k}={v!r}" for k, v in scales.as_dict().items())
        args = ["bake", "--model", str(model_dir.resolve()), "--out", str(out_dir.resolve()), "--scales", scale_arg,
                "--dtype", dtype, "--digests", str(self.cache_dir / DIGEST_FILE)]
        for kind, path, allow_base_mismatch in adapters:
            args += ["--adapter", f"{kind}:{Path(path).resolve()}"]
            if allow_base_mismatch:
                args += ["--allow-base-mismatch", str(Path(path).resolve())]
        self._run("bake", args, read_only=[model_dir, *(adapter[1] for adapter in adapters)])

    def convert(self, baked_dir, out_file, outtype, metadata) -> None:
        import json

        self._run("convert", ["convert", str(baked_dir.resolve()), "--out", str(out_file.resolve()),
                              "--outtype", outtype, "--metadata-json", json.dumps(metadata)])

    def quantize(self, in_file, out_file, quant) -> None:
        self._run("quantize", ["quantize", str(in_file.resolve()), "--out", str(out_file.resolve()),
                               "--type", quant.name])

    def llama_cpp_version(self) -> str:
        if self._version is None:
            lines = [line for line in self._run("version", ["version"]) if line.strip()]
            self._version = lines[-1]
        return self._version
