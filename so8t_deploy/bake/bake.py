"""The streaming bake: fold adapters into a model directory, one tensor at a time.

Memory stays bounded by a few tensors: each shard is written header-first, tensors are read
in file order one at a time (a thread reads ahead and hashes the file on the way), folded
tensors are edited in float32 a few rows at a time and cast back, and untouched tensors are
written byte for byte. Output appears atomically: everything is written into a
staging directory, fsynced, stamped with `so8t_bake.json` (the completion marker and
provenance) and only then renamed into place. A killed bake leaves only a staging
directory, which is never trusted and is removed by the next bake into the same place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..cache import DIGEST_FILE, default_cache_root
from ..errors import UsageError
from ..fsutil import fsync_path
from ..hashing import DigestCache, combined_digest
from ..manifest import Scales
from .adapters import Adapter, load_adapter
from .edits import BakePlan, fold_in_chunks, plan_bake
from .layout import EMBED, LM_HEAD, layout_from_config
from .model_dir import INDEX_FILE, ModelDirectory, open_model_dir
from .safetensors_io import DTYPES, OutputTensor, ShardWriter, TensorEntry
from .so8t_adapter import So8tAdapter
from .stream import ShardReader, read_ahead

PROVENANCE_FILE = "so8t_bake.json"
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class BakeResult:
    out_dir: Path
    folded: int  # tensors that adapters changed
    copied: int  # tensors copied byte for byte
    provenance: dict


def _output_dtype(source_dtype: str, dtype: str) -> str:
    if dtype == "auto" or source_dtype not in ("F32", "F16", "BF16"):
        return source_dtype
    return DTYPE_NAMES[dtype]


def _prepare_destination(out_dir: Path) -> Path:
    """Refuse to clobber what is not ours; clear stale staging dirs; return a new staging dir."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / PROVENANCE_FILE).is_file():
        raise UsageError(f"{out_dir}: exists and is not a bake output; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    staging.mkdir()
    return staging


def _publish(staging: Path, out_dir: Path) -> None:
    """Swap the finished staging directory into place with renames only."""
    fsync_path(staging)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    staging.rename(out_dir)
    fsync_path(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



ShardItems = list[tuple[OutputTensor, TensorEntry]]


@dataclass
class _ShardResults:
    weight_map: dict[str, str] = field(default_factory=dict)
    shard_digests: dict[str, str] = field(default_factory=dict)
    folded: int = 0
    copied: int = 0
    total_bytes: int = 0


def _shard_layout(model: ModelDirectory, plan: BakePlan, dtype: str) -> dict[str, ShardItems]:
    """Output tensors per shard file, in source byte order; an untied lm_head follows the embeddings."""
    shards: dict[str, ShardItems] = {}
    for shard in model.shards:
        items = shards.setdefault(shard.path.name, [])
        for entry in sorted(shard.tensors.values(), key=lambda e: e.start):
            items.append((OutputTensor(entry.name, _output_dtype(entry.dtype, dtype), entry.shape), entry))
            if entry.name == EMBED and plan.untie_lm_head:
                items.append((OutputTensor(LM_HEAD, _output_dtype(entry.dtype, dtype), entry.shape), entry))
    return shards


def _write_shards(model: ModelDirectory, plan: BakePlan, dtype: str, staging: Path, digests: DigestCache,
                  on_progress: ProgressCallback | None) -> _ShardResults:
    results = _ShardResults()
    # Parallelise over row chunks with our own threads, one torch thread each: torch's OpenMP
    # workers spin-wait, and beside the read-ahead thread that cost a third of the wall time.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="so8t-fold") as folders:
            for file_name, items in _shard_layout(model, plan, dtype).items():
                source = model.path / file_name
                reader = ShardReader(source, items, known_sha256=digests.known(source))
                _write_shard(reader, staging / file_name, plan, folders, results, on_progress)
                digests.record(source, reader.sha256)
    finally:
        torch.set_num_threads(torch_threads)
    return results


def _write_shard(reader: ShardReader, target: Path, plan: BakePlan, folders: ThreadPoolExecutor,
                 results: _ShardResults, on_progress: ProgressCallback | None) -> None:
    writer = ShardWriter(target, [out for out, _ in reader.items])
    for tensor in read_ahead(reader):
        out, entry = tensor.out, tensor.entry
        edits = plan.edits.get(out.name, [])
        if not edits and out.dtype == entry.dtype:
            writer.write(out.name, [tensor.data])  # byte for byte
            results.copied += 1
        else:
            weight = tensor.data.view(DTYPES[entry.dtype][0]).reshape(entry.shape)
            writer.write(out.name, fold_in_chunks(weight, edits, DTYPES[out.dtype][0], executor=folders))
            results.folded += bool(edits)
        results.weight_map[out.name] = target.name
        results.total_bytes += out.nbytes
        if on_progress:
            on_progress(out.nbytes)
    writer.close()
    results.shard_digests[target.name] = reader.sha256


def _copy_other_files(model: ModelDirectory, staging: Path, config_updates: dict) -> None:
    """Tokenizer, generation config and the rest, unchanged; config.json only where the spec says."""
    for item in sorted(model.path.iterdir()):
        if item.name in model.weight_files or item.name == PROVENANCE_FILE:
            continue
        if item.name == "config.json" and config_updates:
            config = {**model.config, **config_updates}
            (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        elif item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)


def _input_digests(model: ModelDirectory, adapters: Sequence[Adapter], shard_digests: dict[str, str],
                   digests: DigestCache) -> dict:
    """sha256 of every input file; the shards' digests were taken while reading them."""
    model_files = {str(p.relative_to(model.path)): digests.file(p) for p in sorted(model.path.rglob("*"))
                   if p.is_file() and str(p.relative_to(model.path)) not in shard_digests}
    model_files.update(shard_digests)
    adapter_entries = []
    for adapter in adapters:
        files = {p.name: digests.file(p) for p in adapter.files}
        kind = "so8t" if isinstance(adapter, So8tAdapter) else "lora"
        adapter_entries.append({"kind": kind, "path": str(adapter.path), "digest": combined_digest(files),
                                "files": files})
    return {"model_files": dict(sorted(model_files.items())), "adapters": adapter_entries}


def load_adapters(adapter_dirs: Sequence[tuple[str | None, Path]], model: ModelDirectory) -> list[Adapter]:
    layout = layout_from_config(model.config, str(model.path / "config.json"))
    names = {model.path.name, str(model.config.get("_name_or_path", ""))}
    adapters = [load_adapter(path, kind) for kind, path in adapter_dirs]
    for adapter in adapters:
        if isinstance(adapter, So8tAdapter):
            adapter.check_base(layout.hidden_size, layout.num_layers, names)
    return adapters


def bake_model(model_dir: Path, adapter_dirs: Sequence[tuple[str | None, Path]], out_dir: Path,
               scales: Scales, dtype: str = "auto", on_progress: ProgressCallback | None = None,
               digests: DigestCache | None = None) -> BakeResult:
    """Fold every adapter, in order, into the model at model_dir; write a plain model to out_dir.

    `digests` remembers the sha256 of input files by (size, mtime, inode); a shard it already
    knows is not hashed again (baking several variants of one base model hashes it once).
    """
    digests = digests if digests is not None else DigestCache(default_cache_root() / DIGEST_FILE)
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype: must be auto, {', '.join(DTYPE_NAMES)}; got {dtype!r}")
    model_dir, out_dir = model_dir.resolve(), out_dir.resolve()
    if out_dir == model_dir or model_dir in out_dir.parents:
        raise UsageError(f"{out_dir}: the output must not be inside the source model directory")
    model = open_model_dir(model_dir)
    layout = layout_from_config(model.config, str(model_dir / "config.json"))
    adapters = load_adapters(adapter_dirs, model)
    shapes = {name: entry.shape for shard in model.shards for name, entry in shard.tensors.items()}
    plan = plan_bake(layout, shapes, adapters, scales)

    staging = _prepare_destination(out_dir)
    try:
        shards = _write_shards(model, plan, dtype, staging, digests, on_progress)
        config_updates = {}
        if plan.untie_lm_head:
            config_updates["tie_word_embeddings"] = False
        if dtype != "auto":
            config_updates["dtype"] = dtype
            if "torch_dtype" in model.config:
                config_updates["torch_dtype"] = dtype
        _copy_other_files(model, staging, config_updates)
        if model.index_metadata is not None:
            index = {"metadata": {**model.index_metadata, "total_size": shards.total_bytes},
                     "weight_map": dict(sorted(shards.weight_map.items()))}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        provenance = {
            "format": "so8t-bake",
            "format_version": 1,
            "tool": {"name": "so8t-deploy", "version": __version__},
            "source": str(model_dir),
            "scales": scales.as_dict(),
            "dtype": dtype,
            "untied_lm_head": plan.untie_lm_head,
            "tensors": {"folded": shards.folded, "copied": shards.copied},
            **_input_digests(model, adapters, shards.shard_digests, digests),
        }
        # The provenance file is the completion marker: written last, then the rename publishes.
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        _publish(staging, out_dir)
        digests.save()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BakeResult(out_dir, shards.folded, shards.copied, provenance)
