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

    def bake(self, model_dir: Path, adapters: Sequence[tuple[str, Path]], out_dir: Path, scales: Scales,
             dtype: str) -> None: ...

    def convert(self, baked_dir: Path, out_file: Path, outtype: str, metadata: dict[str, str]) -> None: ...

    def quantize(self, in_file: Path, out_file: Path, quant: QuantType) -> None: ...

    def llama_cpp_version(self) -> str: ...


def runner_for(manifest: Manifest, cache_dir: Path) -> Runner:
    """The runner that the manifest's runtime.backend names."""
    if manifest.runtime.backend == "docker":
        from .errors import UsageError

        raise UsageError("runtime.backend: docker is not available in this build; use backend: local")
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
