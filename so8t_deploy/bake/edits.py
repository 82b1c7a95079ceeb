"""Edits to one weight tensor, and their application a few rows at a time.

A bake plan gives each output tensor an ordered list of edits. Every edit acts on rows
independently, or within aligned groups of 8 rows (output-side block maps), or scales
columns by a factor that one extra pass over the rows computes (DoRA on an embedding).
So a tensor can be edited in row chunks that are small enough to stay in the CPU cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from .maps import BlockDiagonalMap, LinearMap


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


def fold_in_chunks(weight: torch.Tensor, edits: Sequence[Edit], out_dtype: torch.dtype,
                   chunk_bytes: int = 2 << 20, executor: Executor | None = None) -> Iterator[torch.Tensor]:
    """Yield the edited tensor a few rows at a time, each block folded in float32 and cast to out_dtype.

    Row chunks start at multiples of 8, so output-side block maps see whole blocks. Small
    float32 chunks stay in the CPU cache (a whole-tensor fold is 2-3x slower, bound by memory
    traffic), and with an executor they fold in parallel while the caller writes the
    finished ones, in order.
    """
    whole_tensor = weight.dim() == 1 or any(
        isinstance(e, LeftMultiply) and not isinstance(e.map, BlockDiagonalMap) for e in edits
    )
    if whole_tensor:
        yield apply_edits(weight.to(torch.float32, copy=True), edits).to(out_dtype)
        return
    rows = weight.shape[0]
    step = max(8, chunk_bytes // (4 * weight.shape[1]) // 8 * 8)
    row_edits = _resolve_column_norms(weight, edits, step)

    def fold(start: int) -> torch.Tensor:
        stop = min(rows, start + step)
        chunk = weight[start:stop].to(torch.float32, copy=True)
        return _apply_to_rows(chunk, row_edits, start, stop).to(out_dtype)

    starts = range(0, rows, step)
    yield from (executor.map(fold, starts) if executor else map(fold, starts))


def _resolve_column_norms(weight: torch.Tensor, edits: Sequence[Edit], step: int) -> list[_RowEdit]:
    """Replace each ScaleColumnsToNorm by its factor: one pass over the rows, with the edits before it applied."""
    resolved: list[_RowEdit] = []
    for edit in edits:
        resolved.append(_column_factor(weight, resolved, edit, step) if isinstance(edit, ScaleColumnsToNorm) else edit)
    return resolved


def _column_factor(weight: torch.Tensor, before: Sequence[_RowEdit], edit: ScaleColumnsToNorm,
                   step: int) -> _ScaleColumns:
    """m / ||W||_col, with W the tensor after the edits `before` it, summed a few rows at a time."""
    squares = torch.zeros(weight.shape[1], dtype=torch.float64)
    for start in range(0, weight.shape[0], step):
        stop = min(weight.shape[0], start + step)
        chunk = _apply_to_rows(weight[start:stop].to(torch.float32, copy=True), before, start, stop)
        squares += chunk.to(torch.float64).square().sum(dim=0)
    return _ScaleColumns((edit.magnitude.to(torch.float64) / squares.sqrt()).to(torch.float32))


def _apply_to_rows(chunk: torch.Tensor, edits: Sequence[_RowEdit], start: int, stop: int) -> torch.Tensor:
    """Apply edits to rows [start, stop) of a tensor, held in `chunk` (float32, edited in place)."""
    for edit in edits:
        if isinstance(edit, LeftMultiply):
            m = edit.map
            if isinstance(m, BlockDiagonalMap):
                m = BlockDiagonalMap(m.blocks[start // 8:(stop + 7) // 8])
            chunk = m.left_multiply(chunk)
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
            target.copy_(edit.map.right_multiply(target))
        elif isinstance(edit, AddVector):
            target.add_(edit.vector[lo - first:hi - first].float())
        else:
            target.add_(edit.delta_rows(lo - first, hi - first))
            if isinstance(edit, DoraLowRank):
                norms = torch.linalg.vector_norm(target, dim=1)
                target.mul_((edit.magnitude[lo - first:hi - first].float() / norms).unsqueeze(1))
    return chunk
