"""`build`: resolve -> bake -> convert -> quantize for every variant, through the artifact cache.

Each step's cache key hashes everything that affects its bytes, so a re-run reuses what is
there and a changed scale rebuilds only its own variant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .cache import DIGEST_FILE, ArtifactCache, cache_key
from .hashing import DigestCache, combined_digest
from .manifest import Manifest
from .plan import VariantPlan, plan_builds
from .quant_types import lookup_quant_type
from .runner import LocalRunner, Runner
from .source import resolve_source

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuiltArtifact:
    variant: str
    tag: str
    quant: str
    path: Path
    size: int
    bits_per_weight: float
    sha256: str


@dataclass(frozen=True)
class BuildReport:
    artifacts: tuple[BuiltArtifact, ...]
    built: int  # steps that ran
    reused: int  # steps found complete in the cache
    unbuilt: tuple[str, ...] = ()  # with dry_run: tags whose artifacts are not in the cache yet
    references: tuple[BuiltArtifact, ...] = ()  # each variant's converted (float) GGUF, deployed or not


class _NotBuilt(Exception):
    """dry_run met a step that is not in the cache."""


def _gguf_record(path: Path) -> dict:
    from .external.gguf_info import read_gguf_info
    from .hashing import sha256_file

    info = read_gguf_info(path)
    return {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path),
            "bits_per_weight": round(info.bits_per_weight, 4), "file_type": info.file_type,
            "architecture": info.architecture}


class _Builder:
    def __init__(self, manifest: Manifest, cache_dir: Path, runner: Runner, log: Log, dry_run: bool = False):
        self.dry_run = dry_run
        self.manifest, self.runner, self.log = manifest, runner, log
        self.cache = ArtifactCache(cache_dir / "objects")
        self.digests = DigestCache(cache_dir / DIGEST_FILE)
        self.cache_dir = cache_dir
        self.source_dir: Path = Path()
        self.references: list[BuiltArtifact] = []
        self._inputs: dict | None = None
        self.adapters: list[tuple[str, Path]] = []
        self.built = self.reused = 0

    def _step(self, stage: str, key: str | Callable[[], str], label: str,
              produce: Callable[[Path, dict], None]) -> tuple[Path, dict]:
        if isinstance(key, str) and (info := self.cache.lookup(stage, key)) is not None:
            self.reused += 1
            return self.cache.path(stage, key), info
        if self.dry_run:
            raise _NotBuilt(label)
        self.log(f"{label} ...")
        with self.cache.produce(stage, key) as (staging, record):
            produce(staging, record)
        self.built += 1
        return self.cache.path(stage, record["key"]), record

    def _input_digests(self) -> dict:
        """Digests of the source model and each adapter, taken once per build (hashing what the
        digest cache lacks, after picking up what a runner recorded while reading them)."""
        if self._inputs is None:
            self.digests.reload()
            adapters = [{"kind": kind, "digest": combined_digest(self.digests.directory(path))}
                        for kind, path in self.adapters]
            self._inputs = {"model": combined_digest(self.digests.directory(self.source_dir)), "adapters": adapters}
        return self._inputs

    def _inputs_known(self) -> bool:
        return self._inputs is not None or all(
            self.digests.knows_directory(p) for p in (self.source_dir, *(p for _, p in self.adapters)))

    def run(self) -> BuildReport:
        self.source_dir = resolve_source(self.manifest.source, self.cache_dir)
        self.adapters = [(a.kind, a.path) for a in self.manifest.source.adapters]
        llama_version = self.runner.llama_cpp_version()
        artifacts, unbuilt = [], []
        try:
            for plan in plan_builds(self.manifest):
                try:
                    artifacts += self._build_variant(plan, llama_version)
                except _NotBuilt:
                    unbuilt += [q.tag for q in plan.quants]
        finally:
            self.digests.save()  # what was hashed stays hashed, even when a later step fails
        return BuildReport(tuple(artifacts), self.built, self.reused, tuple(unbuilt), tuple(self.references))

    def _bake(self, plan: VariantPlan) -> tuple[str, Path, list]:
        scales, dtype = plan.scales.as_dict(), self.manifest.bake.dtype

        def bake_key() -> str:
            return cache_key(stage="bake", tool=__version__, **self._input_digests(), scales=scales, dtype=dtype)

        def bake(staging: Path, record: dict) -> None:
            adapters = [(a.kind, a.path, a.allow_base_mismatch) for a in self.manifest.source.adapters]
            self.runner.bake(self.source_dir, adapters, staging / "model", plan.scales, dtype)
            record.update(variant=plan.variant, scales=scales)

        # New inputs are hashed by the bake itself as it streams them (no separate pass over
        # a multi-GB model); the step's key is known once it finished.
        key = bake_key() if self._inputs_known() else bake_key
        bake_dir, record = self._step("bake", key, f"bake {plan.variant}", bake)
        return record["key"], bake_dir, self._input_digests()["adapters"]

    def _build_variant(self, plan: VariantPlan, llama_version: str) -> list[BuiltArtifact]:
        m = self.manifest
        scales = plan.scales.as_dict()
        bake_key, bake_dir, adapter_digests = self._bake(plan)

        metadata = {
            "so8t.source_model": m.source.model + (f"@{m.source.revision}" if m.source.revision else ""),
            "so8t.adapters": json.dumps(adapter_digests, sort_keys=True),
            "so8t.scales": json.dumps(scales, sort_keys=True),
            "so8t.variant": plan.variant,
            "so8t.manifest_name": m.name,
            "so8t.tool_version": __version__,
            # With general.file_type, these two identify a GGUF's bytes: a host's copy can be
            # recognised from /api/show alone, without the local record of what was uploaded.
            "so8t.bake_key": bake_key,
            "so8t.llama_cpp": llama_version,
        }
        convert_key = cache_key(stage="convert", bake=bake_key, outtype=plan.convert_type, llama=llama_version,
                                metadata=metadata)
        file_name = f"{m.name}-{plan.variant}-{{quant}}.gguf"

        def convert(staging: Path, record: dict) -> None:
            out = staging / file_name.format(quant=plan.convert_type)
            self.runner.convert(bake_dir / "model", out, plan.convert_type, metadata)
            record.update(_gguf_record(out))

        convert_dir, convert_record = self._step("convert", convert_key, f"convert {plan.variant} -> "
                                                 f"{plan.convert_type}", convert)
        converted = convert_dir / convert_record["file"]
        self.references.append(BuiltArtifact(plan.variant, m.tag(plan.variant, plan.convert_type), plan.convert_type,
                                             converted, convert_record["size"], convert_record["bits_per_weight"],
                                             convert_record["sha256"]))
        built = []
        for quant in plan.quants:
            if quant.quant == plan.convert_type:
                directory, record = convert_dir, convert_record
            else:
                quant_type = lookup_quant_type(quant.quant)
                key = cache_key(stage="quantize", convert=convert_key, quant=quant.quant, llama=llama_version)

                def quantize(staging: Path, record: dict, quant_type=quant_type) -> None:
                    out = staging / file_name.format(quant=quant_type.name)
                    self.runner.quantize(converted, out, quant_type)
                    record.update(_gguf_record(out))

                directory, record = self._step("quantize", key, f"quantize {plan.variant} -> {quant.quant}", quantize)
            built.append(BuiltArtifact(plan.variant, quant.tag, quant.quant, directory / record["file"],
                                       record["size"], record["bits_per_weight"], record["sha256"]))
        return built


def build(manifest: Manifest, cache_dir: Path, runner: Runner | None = None, log: Log = lambda _: None,
          dry_run: bool = False) -> BuildReport:
    """Build every tag's GGUF; reuse whatever the cache already holds (with dry_run, only that)."""
    runner = runner or LocalRunner(digest_file=cache_dir / DIGEST_FILE)
    return _Builder(manifest, cache_dir, runner, log, dry_run).run()
