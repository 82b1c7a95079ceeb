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
import math
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..cancel import leave_interrupts_to_the_main_thread
from ..errors import AdapterError, SettingError, UsageError
from ..fsutil import fsync_path
from ..manifest.schema import Scales
from ..store.hashing import BLAKE3, DigestCache, Stamp
from ..store.provenance import PROVENANCE_FILE, adapter_digest
from ..store.workspace import Workspace, default_root
from .adapters import Adapter, AdapterSpec, AdapterSpecs, as_specs, kind_of, load_adapters
from .edits import chunk_folds, fold_in_chunks
from .layout import EMBED, layout_from_config
from .lora_adapter import TOKENIZER_FILES, LoraAdapter, TensorRef
from .model_dir import INDEX_FILE, ModelDirectory, check_shapes, open_model_dir
from .phases import PhaseTimes
from .plan import BakePlan, BaseTensor
from .planners import plan_bake
from .safetensors_io import DTYPES, OutputTensor, ShardHeader, ShardWriter, TensorEntry, nonfinite_at
from .stream import ShardReader, Source, SourceTensor, read_ahead
from .vocab import tokenizer_for

DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class BakeResult:
    out_dir: Path
    folded: int  # tensors that adapters changed
    copied: int  # tensors copied byte for byte
    provenance: dict[str, Any]
    phases: dict[str, dict[str, float]]  # per phase, CPU and wall seconds summed over threads (see phases.py)


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



ShardItems = list[tuple[OutputTensor, Source]]


@dataclass
class _ShardResults:
    weight_map: dict[str, str] = field(default_factory=dict)
    shard_digests: dict[str, str] = field(default_factory=dict)
    folded: int = 0
    copied: int = 0
    total_bytes: int = 0


def _output_item(name: str, shard: ShardHeader, plan: BakePlan, dtype: str) -> tuple[OutputTensor, Source]:
    tensor = plan.tensors.get(name)
    if tensor is None:
        entry = shard.tensors[name]
        return OutputTensor(name, _output_dtype(entry.dtype, dtype), entry.shape), entry
    source = shard.tensors[tensor.source.name] if isinstance(tensor.source, BaseTensor) else tensor.source
    return OutputTensor(name, _output_dtype(shard.tensors[tensor.like].dtype, dtype), tensor.shape), source


def _shard_layout(model: ModelDirectory, plan: BakePlan, dtype: str) -> dict[str, ShardItems]:
    """Output tensors per shard file, in source byte order; a tensor the base lacks follows its neighbour."""
    added: dict[str, list[str]] = {}
    for name, tensor in sorted(plan.tensors.items()):
        if tensor.after is not None:
            added.setdefault(tensor.after, []).append(name)
    shards: dict[str, ShardItems] = {}
    for shard in model.shards:
        items = shards.setdefault(shard.path.name, [])
        for entry in sorted(shard.tensors.values(), key=lambda e: e.start):
            items += [_output_item(name, shard, plan, dtype) for name in (entry.name, *added.get(entry.name, ()))]
    return shards


class _OutputBuffer:
    """A buffer folded tensors are written into, one after another: faulted in once, reused for the whole bake."""

    def __init__(self) -> None:
        self._bytes = torch.empty(0, dtype=torch.uint8)

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._bytes.numel() < nbytes:
            self._bytes = torch.empty(0, dtype=torch.uint8)  # let the old one go first
            self._bytes = torch.empty(nbytes, dtype=torch.uint8)
        return self._bytes[:nbytes].view(dtype).view(shape)


def bake_device() -> torch.device | None:
    """Where folds run: a CUDA device when one is visible, else the host's threads (None).

    SO8T_BAKE_DEVICE overrides it: `host` for the threaded host path, or a torch device (`cuda:1`, or `cpu`
    for the device path on the CPU, which is how it is tested without a GPU).
    """
    wanted = os.environ.get("SO8T_BAKE_DEVICE", "auto").strip()
    if wanted in ("", "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else None
    if wanted == "host":
        return None
    try:
        device = torch.device(wanted)
    except RuntimeError as e:
        raise UsageError(f"SO8T_BAKE_DEVICE: {wanted!r} is not auto, host or a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"SO8T_BAKE_DEVICE: {wanted!r}, but no CUDA device is visible")
    return device


@dataclass(frozen=True)
class _Run:
    """How one bake runs: its output dtype, where folds run (None: the host's threads), the digests of known
    inputs, a progress callback, and where each phase's time is added up."""

    dtype: str
    device: torch.device | None
    digests: DigestCache
    on_progress: ProgressCallback | None
    times: PhaseTimes = field(default_factory=PhaseTimes)


def _write_shards(model: ModelDirectory, plan: BakePlan, staging: Path, run: _Run) -> _ShardResults:
    results = _ShardResults()
    buffers = (_OutputBuffer(), _OutputBuffer())
    # Parallelise over row chunks with our own threads, one torch thread each: torch's OpenMP
    # workers spin-wait, and beside the read-ahead thread that cost a third of the wall time.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="so8t-fold",
                                initializer=leave_interrupts_to_the_main_thread) as folders:
            for file_name, items in _shard_layout(model, plan, run.dtype).items():
                source = model.path / file_name
                stamp = Stamp.of(source)  # taken before reading: a file changed meanwhile is hashed again
                known = run.digests.identity(source, stamp)
                reader = ShardReader(source, items, known, _verbatim(items, plan), run.times)
                shard = _ShardWriting(plan, results, buffers, run.times, folders if run.device is None else None,
                                      run.device)
                shard.write(reader, staging / file_name, run.on_progress)
                if known is None:
                    run.digests.record(source, reader.identity, BLAKE3, stamp)
    finally:
        torch.set_num_threads(torch_threads)
    return results


def _verbatim(items: ShardItems, plan: BakePlan) -> frozenset[str]:
    """The outputs that are bytes of the shard as they are: no edits, no cast."""
    return frozenset(out.name for out, source in items if isinstance(source, TensorEntry)
                     and not (out.name in plan.tensors and plan.tensors[out.name].edits)
                     and out.dtype == source.dtype)


def _source_weight(tensor: SourceTensor) -> torch.Tensor:
    source, data = tensor.source, tensor.data
    assert data is not None  # only verbatim tensors come without bytes
    if isinstance(source, TensorRef) and (found := nonfinite_at(data, source.dtype, source.shape)):
        raise AdapterError(f"{source.path}: tensor {source.entry.name!r} (for {tensor.out.name!r}) contains "
                           f"NaN or infinity (first: {found})")
    return data.view(DTYPES[source.dtype][0]).reshape(source.shape)


@dataclass(frozen=True)
class _Started:
    """A tensor whose output is under way: its folded parts (in order), or None for a copy of its file range."""

    tensor: SourceTensor
    parts: Iterable[torch.Tensor] | None
    futures: list[Future[torch.Tensor]] = field(default_factory=list)


@dataclass
class _ShardWriting:
    """Writes a shard one tensor behind the folds: while tensor i is written, tensor i + 1 already folds.

    Folded tensors take turns in two output buffers, so the one being written is never the one being folded.
    """

    plan: BakePlan
    results: _ShardResults
    buffers: tuple[_OutputBuffer, _OutputBuffer]
    times: PhaseTimes
    folders: ThreadPoolExecutor | None
    device: torch.device | None
    _turn: int = 0

    def write(self, reader: ShardReader, target: Path, on_progress: ProgressCallback | None) -> None:
        writer = ShardWriter(target, [out for out, _ in reader.items], times=self.times)
        source_fd = os.open(reader.path, os.O_RDONLY)  # verbatim tensors are read from here
        started: list[_Started] = []
        try:
            for tensor in read_ahead(reader):
                started.append(self._start(tensor))
                if len(started) == 2:
                    self._finish(writer, source_fd, started.pop(0), target.name, on_progress)
            for rest in started:
                self._finish(writer, source_fd, rest, target.name, on_progress)
            writer.close()
        except BaseException:
            for unfinished in started:
                for future in unfinished.futures:
                    future.cancel()
            writer.abandon()
            raise
        finally:
            os.close(source_fd)
        self.results.shard_digests[target.name] = reader.identity

    def _start(self, tensor: SourceTensor) -> _Started:
        out, source = tensor.out, tensor.source
        planned = self.plan.tensors.get(out.name)
        edits = planned.edits if planned else []
        # The base's own bytes need no look; anything else is checked (and counts as changed).
        changed = bool(edits) or (planned is not None and planned.source != BaseTensor(out.name))
        self.results.folded += changed
        self.results.copied += not changed
        if tensor.copy is not None:
            return _Started(tensor, None)
        weight = _source_weight(tensor)
        if not edits and out.dtype == source.dtype:
            return _Started(tensor, [weight])  # an adapter's tensor or zeros, byte for byte
        out_dtype = DTYPES[out.dtype][0]
        self._turn ^= 1
        buffer = self.buffers[self._turn].get(out.shape, out_dtype)
        if self.folders is None:  # the device path: folded as it is written
            return _Started(tensor, fold_in_chunks(weight, edits, out_dtype, out=buffer, device=self.device,
                                                   times=self.times))
        futures = [self.folders.submit(task) for task in chunk_folds(weight, edits, out_dtype, out=buffer,
                                                                     times=self.times)]
        return _Started(tensor, (future.result() for future in futures), futures)

    def _finish(self, writer: ShardWriter, source_fd: int, started: _Started, target: str,
                on_progress: ProgressCallback | None) -> None:
        out, copy = started.tensor.out, started.tensor.copy
        if started.parts is None:
            assert copy is not None
            writer.copy_range(out.name, source_fd, copy.offset, copy.nbytes)
        else:
            writer.write(out.name, started.parts)
        self.results.weight_map[out.name] = target
        self.results.total_bytes += out.nbytes
        if on_progress:
            on_progress(out.nbytes)


def _copy_other_files(model: ModelDirectory, staging: Path, config_updates: dict[str, Any],
                      tokenizer: list[Path]) -> None:
    """Tokenizer, generation config and the rest, unchanged; config.json only where the spec says.

    `tokenizer`: an adapter's tokenizer files, shipped instead of the base's (a resized vocabulary).
    """
    for item in sorted(model.path.iterdir()):
        if item.name in model.weight_files or item.name == PROVENANCE_FILE:
            continue
        if tokenizer and item.name in TOKENIZER_FILES:
            continue
        if item.name == "config.json" and config_updates:
            config = {**model.config, **config_updates}
            (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        elif item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)
    for item in tokenizer:
        shutil.copy2(item, staging / item.name)


@dataclass(frozen=True)
class PreparedBake:
    model: ModelDirectory
    specs: list[AdapterSpec]
    adapters: list[Adapter]
    plan: BakePlan
    tokenizer: list[Path]  # adapter tokenizer files that replace the base's


def _input_digests(prepared: PreparedBake, shard_digests: dict[str, str], digests: DigestCache) -> dict[str, Any]:
    """The identity of every input file, and each adapter's digest in fold order; the shards' were taken while reading.

    A file already verified against the hub's sha256 keeps that identity; any other is hashed with BLAKE3.
    """
    model, specs, adapters = prepared.model, prepared.specs, prepared.adapters
    model_files = {str(p.relative_to(model.path)): digests.identity(p) or digests.file(p)
                   for p in sorted(model.path.rglob("*"))
                   if p.is_file() and str(p.relative_to(model.path)) not in shard_digests}
    model_files.update(shard_digests)
    adapter_entries = []
    for position, (spec, adapter) in enumerate(zip(specs, adapters, strict=True)):
        digest, files = adapter_digest(adapter.path, digests)
        entry = {"position": position, "kind": kind_of(adapter), "path": str(adapter.path), "digest": digest,
                 "files": files}
        if isinstance(adapter, LoraAdapter):
            entry["features"] = list(adapter.config.features)
        if spec.allow_base_mismatch:
            entry["allow_base_mismatch"] = True
        adapter_entries.append(entry)
    return {"model_files": dict(sorted(model_files.items())), "adapters": adapter_entries}


def prepare_bake(model_dir: Path, adapter_specs: AdapterSpecs, scales: Scales) -> PreparedBake:
    """Everything decided before a byte is written: the inputs validated, the plan, the tokenizer."""
    model = open_model_dir(model_dir)
    layout = layout_from_config(model.config, str(model_dir / "config.json"))
    check_shapes(model, layout)
    specs = as_specs(adapter_specs)
    adapters = load_adapters(specs, model)
    shapes = {name: entry.shape for shard in model.shards for name, entry in shard.tensors.items()}
    plan = plan_bake(layout, shapes, adapters, scales)
    tokenizer = []
    if "vocab_size" in plan.config_updates:
        rows = plan.require_shape(EMBED, str(model_dir))[0]
        tokenizer = tokenizer_for(plan.vocabulary_from, model_dir, shapes[EMBED][0], rows)
    return PreparedBake(model, specs, adapters, plan, tokenizer)


def _write_index(model: ModelDirectory, shards: _ShardResults, staging: Path) -> None:
    if model.index_metadata is not None:
        index = {"metadata": {**model.index_metadata, "total_size": shards.total_bytes},
                 "weight_map": dict(sorted(shards.weight_map.items()))}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _config_updates(model: ModelDirectory, plan: BakePlan, dtype: str) -> dict[str, Any]:
    updates = dict(plan.config_updates)
    if plan.untie_lm_head:
        updates["tie_word_embeddings"] = False
    if dtype != "auto":
        updates["dtype"] = dtype
        if "torch_dtype" in model.config:
            updates["torch_dtype"] = dtype
    return updates


def _check_arguments(model_dir: Path, out_dir: Path, dtype: str) -> tuple[Path, Path]:
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise SettingError("dtype", f"must be auto, {', '.join(DTYPE_NAMES)}; got {dtype!r}")
    model_dir, out_dir = model_dir.resolve(), out_dir.resolve()
    if out_dir == model_dir or model_dir in out_dir.parents:
        raise UsageError(f"{out_dir}: the output must not be inside the source model directory")
    return model_dir, out_dir


def bake_model(model_dir: Path, adapter_dirs: AdapterSpecs, out_dir: Path, scales: Scales, *, dtype: str = "auto",
               on_progress: ProgressCallback | None = None, digests: DigestCache | None = None,
               device: torch.device | None | str = "auto") -> BakeResult:
    """Fold every adapter, in order, into the model at model_dir; write a plain model to out_dir.

    `adapter_dirs`: AdapterSpec or (kind, path[, allow_base_mismatch]) items, in fold order.
    `digests` remembers the digests of input files by their stamp; a shard it already knows is not
    hashed again (baking several variants of one base model hashes it once).
    `device`: where the folds run; "auto" asks `bake_device()`, None is the host's threads.
    """
    digests = digests if digests is not None else Workspace(default_root()).digests()
    model_dir, out_dir = _check_arguments(model_dir, out_dir, dtype)
    prepared = prepare_bake(model_dir, adapter_dirs, scales)
    model, plan = prepared.model, prepared.plan

    staging = _prepare_destination(out_dir)
    try:
        fold_device = bake_device() if device == "auto" else torch.device(device) if isinstance(device, str) else device
        run = _Run(dtype, fold_device, digests, on_progress)
        shards = _write_shards(model, plan, staging, run)
        config_updates = _config_updates(model, plan, dtype)
        _copy_other_files(model, staging, config_updates, prepared.tokenizer)
        _write_index(model, shards, staging)
        provenance = {
            "format": "so8t-bake",
            "format_version": 1,
            "tool": {"name": "so8t-deploy", "version": __version__},
            "source": str(model_dir),
            "scales": scales.as_dict(),
            "dtype": dtype,
            "untied_lm_head": plan.untie_lm_head,
            "config_updates": config_updates,
            "tensors": {"folded": shards.folded, "copied": shards.copied},
            **_input_digests(prepared, shards.shard_digests, digests),
        }
        # The provenance file is the completion marker: written last, then the rename publishes.
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        _publish(staging, out_dir)
        digests.save()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BakeResult(out_dir, shards.folded, shards.copied, provenance, run.times.as_dict())
