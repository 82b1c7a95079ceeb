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


def _gguf_record(path: Path) -> dict:
    from .external.gguf_info import read_gguf_info
    from .hashing import sha256_file

    info = read_gguf_info(path)
    return {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path),
            "bits_per_weight": round(info.bits_per_weight, 4), "file_type": info.file_type,
            "architecture": info.architecture}


class _Builder:
    def __init__(self, manifest: Manifest, cache_dir: Path, runner: Runner, log: Log):
        self.manifest, self.runner, self.log = manifest, runner, log
        self.cache = ArtifactCache(cache_dir / "objects")
        self.digests = DigestCache(cache_dir / DIGEST_FILE)
        self.cache_dir = cache_dir
        self.built = self.reused = 0

    def _step(self, stage: str, key: str, label: str, produce: Callable[[Path, dict], None]) -> tuple[Path, dict]:
        info = self.cache.lookup(stage, key)
        if info is not None:
            self.reused += 1
            return self.cache.path(stage, key), info
        self.log(f"{label} ...")
        with self.cache.produce(stage, key) as (staging, record):
            produce(staging, record)
        self.built += 1
        return self.cache.path(stage, key), record

    def run(self) -> BuildReport:
        source_dir = resolve_source(self.manifest.source, self.cache_dir)
        model_digest = combined_digest(self.digests.directory(source_dir))
        adapters = [(a.kind, a.path) for a in self.manifest.source.adapters]
        adapter_digests = [{"kind": kind, "digest": combined_digest(self.digests.directory(path))}
                           for kind, path in adapters]
        self.digests.save()
        llama_version = self.runner.llama_cpp_version()
        artifacts = []
        for plan in plan_builds(self.manifest):
            artifacts += self._build_variant(plan, source_dir, adapters, model_digest, adapter_digests, llama_version)
        return BuildReport(tuple(artifacts), self.built, self.reused)

    def _build_variant(self, plan: VariantPlan, source_dir, adapters, model_digest, adapter_digests,
                       llama_version) -> list[BuiltArtifact]:
        m = self.manifest
        scales, dtype = plan.scales.as_dict(), m.bake.dtype
        bake_key = cache_key(stage="bake", tool=__version__, model=model_digest, adapters=adapter_digests,
                             scales=scales, dtype=dtype)

        def bake(staging: Path, record: dict) -> None:
            self.runner.bake(source_dir, adapters, staging / "model", plan.scales, dtype)
            record.update(variant=plan.variant, scales=scales)

        bake_dir, _ = self._step("bake", bake_key, f"bake {plan.variant}", bake)

        metadata = {
            "so8t.source_model": m.source.model + (f"@{m.source.revision}" if m.source.revision else ""),
            "so8t.adapters": json.dumps(adapter_digests, sort_keys=True),
            "so8t.scales": json.dumps(scales, sort_keys=True),
            "so8t.variant": plan.variant,
            "so8t.manifest_name": m.name,
            "so8t.tool_version": __version__,
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


def build(manifest: Manifest, cache_dir: Path, runner: Runner | None = None, log: Log = lambda _: None) -> BuildReport:
    """Build every tag's GGUF; reuse whatever the cache already holds."""
    runner = runner or LocalRunner(digest_file=cache_dir / DIGEST_FILE)
    return _Builder(manifest, cache_dir, runner, log).run()
