"""Edits to one weight tensor, and their application a few rows at a time.

A bake plan gives each output tensor an ordered list of edits. Every edit acts on rows
independently, or within aligned groups of 8 rows (output-side block maps), or scales
columns by a factor that one extra pass over the rows computes (DoRA on an embedding).
So a tensor can be edited in row chunks that are small enough to stay in the CPU cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch

from .maps import BlockDiagonalMap, LinearMap
from .phases import PhaseTimes


@dataclass(frozen=True)
class RightMultiply:
    """W[rows] <- W[rows] M: a map on the layer's input."""

    map: LinearMap
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class LeftMultiply:
    """W <- M W (and b <- M b): a map on the layer's output."""

    map: LinearMap


@dataclass(frozen=True)
class AddLowRank:
    """W[rows] <- W[rows] + scaling * B A: a merged LoRA update, formed a few rows at a time."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [len(rows), r]
    scaling: float
    rows: tuple[int, int] | None = None

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the update, counted inside its own row range."""
        return self.scaling * (self.b[start:stop].float() @ self.a.float())


@dataclass(frozen=True)
class DoraLowRank(AddLowRank):
    """DoRA: W[rows] <- m * (W + s B A) / ||W + s B A||, each row to its own magnitude.

    PEFT takes the norm of each output row of the weight as it stands (after every earlier
    edit here), so rows stay independent.
    """

    # Keyword-only: it follows AddLowRank's defaulted `rows`, yet every DoRA update has one.
    magnitude: torch.Tensor = field(kw_only=True)  # [len(rows)]


@dataclass(frozen=True)
class AddVector:
    """b[rows] <- b[rows] + v: a LoRA bias (scaling already applied)."""

    vector: torch.Tensor
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class ScaleColumnsToNorm:
    """W <- W * (m / ||W||_col): DoRA on an embedding, whose norm runs over every row of a column."""

    magnitude: torch.Tensor  # [columns]


@dataclass(frozen=True)
class _ScaleColumns:
    """ScaleColumnsToNorm with its factor computed (by a pass over the whole tensor)."""

    factor: torch.Tensor


Edit = RightMultiply | LeftMultiply | AddLowRank | DoraLowRank | AddVector | ScaleColumnsToNorm
# What row chunks are edited with: every ScaleColumnsToNorm already turned into its factor.
_RowEdit = RightMultiply | LeftMultiply | AddLowRank | DoraLowRank | AddVector | _ScaleColumns


def apply_edits(weight: torch.Tensor, edits: Sequence[Edit]) -> torch.Tensor:
    """Apply edits in order to a whole float32 tensor (a weight matrix or a bias vector)."""
    rows = weight.shape[0]
    return _apply_to_rows(weight, _resolve_column_norms(weight, edits, max(rows, 1)), 0, rows)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision edits are computed in: float32 for 16- and 32-bit weights, float64 for float64 ones."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold_in_chunks(weight: torch.Tensor, edits: Sequence[Edit], out_dtype: torch.dtype,
                   chunk_bytes: int = 1 << 20, executor: Executor | None = None, *,
                   out: torch.Tensor | None = None, device: torch.device | None = None,
                   times: PhaseTimes | None = None) -> Iterator[torch.Tensor]:
    """Yield the edited tensor a few rows at a time, each block folded in working precision and cast to out_dtype.

    With an executor the chunks fold in parallel while the caller writes the finished ones, in
    order. `out` and `device` are as in `chunk_folds`.
    """
    tasks = chunk_folds(weight, edits, out_dtype, chunk_bytes, out=out, device=device, times=times)
    with _ieee_float32(device):
        yield from (executor.map(_run, tasks) if executor else map(_run, tasks))


def _run(task: Callable[[], torch.Tensor]) -> torch.Tensor:
    return task()


def chunk_folds(weight: torch.Tensor, edits: Sequence[Edit], out_dtype: torch.dtype, chunk_bytes: int = 1 << 20,
                *, out: torch.Tensor | None = None, device: torch.device | None = None,
                times: PhaseTimes | None = None) -> list[Callable[[], torch.Tensor]]:
    """The edited tensor as independent tasks, one per chunk of rows, in order: each returns its rows, folded.

    Row chunks start at multiples of 8, so output-side block maps see whole blocks. Small
    chunks stay in the CPU cache (a whole-tensor fold is 2-3x slower, bound by memory
    traffic), and each thread reuses its scratch buffers from chunk to chunk.

    `out`: a tensor of weight's shape and out_dtype that receives the result; the chunks returned
    are its rows. `device`: fold there (a GPU), moving each chunk over and back.
    """
    times = times or PhaseTimes()
    work = working_dtype(weight.dtype)
    whole_tensor = weight.dim() == 1 or any(
        isinstance(e, LeftMultiply) and not isinstance(e.map, BlockDiagonalMap) for e in edits
    )
    if whole_tensor:
        def fold_whole() -> torch.Tensor:
            with times.phase("fold"):
                folded = apply_edits(weight.to(work, copy=True), edits).to(out_dtype)
            return folded if out is None else out.copy_(folded)

        return [fold_whole]
    rows, columns = weight.shape
    step = max(8, chunk_bytes // (work.itemsize * columns) // 8 * 8)
    row_edits = _resolve_column_norms(weight, edits, step)
    if device is not None:
        row_edits = [_moved(edit, device) for edit in row_edits]

    # A block map on every row, last, writes its product straight into the output, rounded to its dtype.
    # If it is the only edit, it also reads the weight as it is: no working-precision copy of the chunk.
    last = row_edits[-1] if row_edits else None
    fused = last if isinstance(last, RightMultiply | LeftMultiply) and isinstance(last.map, BlockDiagonalMap) \
        and getattr(last, "rows", None) is None else None
    before = row_edits[:-1] if fused else row_edits

    def fold(start: int) -> torch.Tensor:
        stop = min(rows, start + step)
        target = torch.empty((stop - start, columns), dtype=out_dtype) if out is None else out[start:stop]
        if fused and not before and device is None:
            with times.phase("fold"):
                _block_map_into(fused, weight[start:stop], target, start)
            return target
        with times.phase("cast"):
            chunk = _scratch("chunk", (stop - start, columns), work, device or weight.device)
            chunk.copy_(weight[start:stop])
        with times.phase("fold"):
            _apply_to_rows(chunk, before, start, stop)
            if fused:
                _block_map_into(fused, chunk, target, start)
        if not fused:
            with times.phase("cast"):
                target.copy_(chunk)
        return target

    return [functools.partial(fold, start) for start in range(0, rows, step)]


_scratch_buffers = threading.local()
T = TypeVar("T")


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer of at least this size, reused from chunk to chunk.

    A fresh multi-MB tensor per chunk comes from a fresh mmap, and faulting its pages in cost more than the
    8x8 products themselves (measured: 0.3 against 0.7 GB/s on one core).
    """
    if not hasattr(_scratch_buffers, "by_key"):
        _scratch_buffers.by_key = {}
    buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = _scratch_buffers.by_key
    key = (name, dtype, device)
    needed = math.prod(shape)
    if key not in buffers or buffers[key].numel() < needed:
        buffers[key] = torch.empty(needed, dtype=dtype, device=device)
    return buffers[key][:needed].view(shape)


def _moved(value: T, device: torch.device) -> T:
    """An edit (or map) with every tensor in it moved to `device`."""
    if isinstance(value, torch.Tensor):
        return cast(T, value.to(device))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return cast(T, dataclasses.replace(value, **{f.name: _moved(getattr(value, f.name), device)
                                                     for f in dataclasses.fields(value) if f.init}))
    return value


@contextmanager
def _ieee_float32(device: torch.device | None) -> Iterator[None]:
    """On a GPU, float32 products in full float32: TF32 would round the weights' mantissas to 10 bits."""
    if device is None or device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


def _resolve_column_norms(weight: torch.Tensor, edits: Sequence[Edit], step: int) -> list[_RowEdit]:
    """Replace each ScaleColumnsToNorm by its factor: one pass over the rows, with the edits before it applied."""
    resolved: list[_RowEdit] = []
    for edit in edits:
        resolved.append(_column_factor(weight, resolved, edit, step) if isinstance(edit, ScaleColumnsToNorm) else edit)
    return resolved


def _column_factor(weight: torch.Tensor, before: Sequence[_RowEdit], edit: ScaleColumnsToNorm,
                   step: int) -> _ScaleColumns:
    """m / ||W||_col, with W the tensor after the edits `before` it, summed a few rows at a time."""
    work = working_dtype(weight.dtype)
    squares = torch.zeros(weight.shape[1], dtype=torch.float64)
    for start in range(0, weight.shape[0], step):
        stop = min(weight.shape[0], start + step)
        chunk = _apply_to_rows(weight[start:stop].to(work, copy=True), before, start, stop)
        squares += chunk.to(torch.float64).square().sum(dim=0)
    return _ScaleColumns((edit.magnitude.to(torch.float64) / squares.sqrt()).to(work))


def _block_map_into(edit: RightMultiply | LeftMultiply, source: torch.Tensor, target: torch.Tensor,
                    first_row: int) -> None:
    """target <- source after one block-map edit on all its rows, which start at `first_row` of the weight.

    `target` may be `source` itself, or of another dtype (the fold's output): the product is rounded to it.
    """
    m = edit.map
    assert isinstance(m, BlockDiagonalMap)
    if isinstance(edit, RightMultiply):
        m.right_multiply_into(source, target)
    else:
        m.left_multiply_into(source, target, first_row)


def _apply_to_rows(chunk: torch.Tensor, edits: Sequence[_RowEdit], start: int, stop: int) -> torch.Tensor:
    """Apply edits to rows [start, stop) of a tensor, held in `chunk` (working precision, edited in place)."""
    for edit in edits:
        if isinstance(edit, LeftMultiply):
            if isinstance(edit.map, BlockDiagonalMap):
                _block_map_into(edit, chunk, chunk, start)
            else:
                chunk.copy_(edit.map.left_multiply(chunk))
            continue
        if isinstance(edit, _ScaleColumns):
            chunk.mul_(edit.factor)
            continue
        first, last = edit.rows or (0, stop)
        lo, hi = max(first, start), min(last, stop)
        if lo >= hi:
            continue
        target = chunk[lo - start:hi - start]
        if isinstance(edit, RightMultiply):
            if isinstance(edit.map, BlockDiagonalMap):
                _block_map_into(edit, target, target, lo)
            else:
                edit.map.right_multiply_(target)
        elif isinstance(edit, AddVector):
            target.add_(edit.vector[lo - first:hi - first].to(target.dtype))
        else:
            target.add_(edit.delta_rows(lo - first, hi - first).to(target.dtype))
            if isinstance(edit, DoraLowRank):
                norms = torch.linalg.vector_norm(target, dim=1)
                target.mul_((edit.magnitude[lo - first:hi - first].to(target.dtype) / norms).unsqueeze(1))
    return chunk
