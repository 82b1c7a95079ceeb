"""Block-diagonal folds of float32 and bfloat16 weights: one definition, a compiled kernel and its torch reference.

For weights folded in float32 (every 16- and 32-bit dtype), a block product is defined so that any
implementation gives the same bits: the map's blocks are rounded to float32, so every product of
a weight and a block entry is exact in float64; the 8 products are summed in float64 in order,
starting from the first; the sum is rounded to float32, then to the output dtype. `torch.bmm` in
float32 leaves its summation order to the BLAS, and runs at about 1 GB/s per core here.

`_blockfold` (`_blockfold.c`, built with the package) runs this at memory speed, with AVX-512 or
AVX2 where the CPU has it. Without it (a build with no C compiler, a GPU, a strided view) the torch
code here computes the same bits, several times slower. tests/test_blockfold.py holds them to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

BLOCK = 8

try:
    from . import _blockfold  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - an install built without a C compiler
    _blockfold = None

_KINDS = {torch.float32: 0, torch.bfloat16: 1}
# The implementations, for tests: "auto" is the fastest there is; the others name the compiled kernel's builds
# (which the CPU must run) and the torch reference.
Implementation = Literal["auto", "avx512", "avx2", "scalar", "torch"]
# Each build's level in the kernel (the most it may use; it runs the best this CPU has up to that), fastest first.
_LEVELS: dict[Implementation, int] = {"avx512": 2, "avx2": 1, "scalar": 0}


def compiled() -> bool:
    """Whether the compiled kernel is installed."""
    return _blockfold is not None


def implementations() -> tuple[Implementation, ...]:
    """Every implementation this install and CPU run, the fastest first."""
    best = _blockfold.level() if _blockfold is not None else -1
    return (*(name for name, level in _LEVELS.items() if level <= best), "torch")


def exact_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 8, 8] float64 blocks rounded to float32 and held in float64: the operands both implementations use."""
    return blocks.to(torch.float32).to(torch.float64).contiguous()


def right_multiply(source: torch.Tensor, blocks: torch.Tensor, target: torch.Tensor,
                   implementation: Implementation = "auto") -> None:
    """target <- source M for [rows, d] matrices; `blocks` ([d/8, 8, 8]) from `exact_blocks`. target may be source."""
    _check(source, target, blocks, blocks.shape[0] * BLOCK == source.shape[1])
    if _compiled_runs(source, target, blocks, implementation):
        _call(_blockfold.right, source, target, blocks, implementation)
        return
    x = source.reshape(source.shape[0], -1, BLOCK).to(torch.float64)
    total = x[:, :, 0:1] * blocks[:, 0, :]
    for k in range(1, BLOCK):
        total.addcmul_(x[:, :, k:k + 1], blocks[:, k, :])
    _round_into(total.reshape(source.shape), target)


def left_multiply(source: torch.Tensor, blocks: torch.Tensor, target: torch.Tensor,
                  implementation: Implementation = "auto") -> None:
    """target <- M source for [rows, columns]; `blocks` ([rows/8, 8, 8]) are these rows'. target may be source."""
    _check(source, target, blocks, blocks.shape[0] * BLOCK == source.shape[0])
    if _compiled_runs(source, target, blocks, implementation):
        _call(_blockfold.left, source, target, blocks, implementation)
        return
    x = source.reshape(-1, BLOCK, source.shape[1]).to(torch.float64)
    total = blocks[:, :, 0:1] * x[:, 0:1, :]
    for j in range(1, BLOCK):
        total.addcmul_(blocks[:, :, j:j + 1], x[:, j:j + 1, :])
    _round_into(total.reshape(source.shape), target)


def _check(source: torch.Tensor, target: torch.Tensor, blocks: torch.Tensor, blocks_fit: bool) -> None:
    if source.dim() != 2 or target.shape != source.shape or not blocks_fit or blocks.dtype != torch.float64:
        raise ValueError(f"a block fold of {tuple(source.shape)} into {tuple(target.shape)} "
                         f"with {tuple(blocks.shape)} {blocks.dtype} blocks")


def _round_into(total: torch.Tensor, target: torch.Tensor) -> None:
    """Round float64 sums to float32, then to target's dtype (never float64 straight to bfloat16)."""
    target.copy_(total.to(torch.float32))


def _compiled_runs(source: torch.Tensor, target: torch.Tensor, blocks: torch.Tensor,
                   implementation: Implementation) -> bool:
    applies = (_blockfold is not None and source.dtype in _KINDS and target.dtype in _KINDS
               and source.device.type == target.device.type == blocks.device.type == "cpu"
               and source.stride(1) == 1 and target.stride(1) == 1 and blocks.is_contiguous())
    if implementation not in ("auto", "torch") and not (applies and implementation in implementations()):
        raise ValueError(f"the compiled kernel does not run here ({implementation})")
    return applies and implementation != "torch"


def _call(kernel: Callable[..., None], source: torch.Tensor, target: torch.Tensor, blocks: torch.Tensor,
          implementation: Implementation) -> None:
    level = max(_LEVELS.values()) if implementation == "auto" else _LEVELS[implementation]
    kernel(source.data_ptr(), _KINDS[source.dtype], source.stride(0),
           target.data_ptr(), _KINDS[target.dtype], target.stride(0),
           source.shape[0], source.shape[1], blocks.data_ptr(), level)
