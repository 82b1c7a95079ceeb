"""SO8T maps and their folds into weight matrices: small, pure tensor functions.

Column-vector convention, as in docs/so8t-adapter-v1: a map turns a hidden vector x into
M x, and a linear layer computes y = W x + b with W of shape [out, in]. Folding a map that
acts on a layer's input is W <- W M; one that acts on its output is W <- M W, b <- M b.

Nothing here ever forms a dense d x d matrix except `dense()`, which tests and the
hook-based reference evaluator use to check the folds against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import blockfold
from .blockfold import BLOCK


def rotation(generator: torch.Tensor) -> torch.Tensor:
    """R = expm(G - G^T) in float64, batched over leading axes; R is in SO(8) by construction."""
    g = generator.to(torch.float64)
    r: torch.Tensor = torch.linalg.matrix_exp(g - g.transpose(-1, -2))
    return r


def gate_strength(scale: float, gate_logit: float) -> float:
    """The coefficient s * sigmoid(g) that blends a rotation with the identity."""
    return scale / (1.0 + math.exp(-gate_logit))


@dataclass(frozen=True)
class BlockDiagonalMap:
    """M = blockdiag(B_1, ..., B_{d/8}), where B_b = I + c (R_b - I)."""

    blocks: torch.Tensor  # [d/8, 8, 8], float64
    # The blocks as folds use them (see blocks_like), by (float64 weights?, device): converted once, not per chunk.
    _converted: dict[tuple[bool, torch.device], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_generators(cls, generators: torch.Tensor, strength: float) -> BlockDiagonalMap:
        eye = torch.eye(BLOCK, dtype=torch.float64)
        return cls(eye + strength * (rotation(generators) - eye))

    @property
    def dim(self) -> int:
        return self.blocks.shape[0] * BLOCK

    def dense(self) -> torch.Tensor:
        dense: torch.Tensor = torch.block_diag(*self.blocks)
        return dense

    def blocks_like(self, weight: torch.Tensor) -> torch.Tensor:
        """The blocks as the fold of `weight` uses them, converted once per dtype and device, not per chunk.

        float64 weights fold with float64 blocks; every other dtype with `blockfold.exact_blocks`.
        """
        wide = weight.dtype == torch.float64
        key = (wide, weight.device)
        if key not in self._converted:
            self._converted[key] = (self.blocks if wide else blockfold.exact_blocks(self.blocks)).to(weight.device)
        return self._converted[key]

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """W M for W of shape [out, d]: one 8x8 product per block, O(out * d * 8)."""
        folded = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        self.right_multiply_into(weight, folded)
        return folded

    def right_multiply_into(self, weight: torch.Tensor, target: torch.Tensor) -> None:
        """target <- W M: `target` has W's shape, and may be W itself or of another dtype (the output's)."""
        if weight.dtype != torch.float64:
            blockfold.right_multiply(weight, self.blocks_like(weight), target)
            return
        out = weight.shape[0]
        product = torch.bmm(weight.reshape(out, -1, BLOCK).transpose(0, 1), self.blocks_like(weight))
        target.view(out, -1, BLOCK).copy_(product.transpose(0, 1))

    def left_multiply(self, weight: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """M W for W of shape [d, in] (or a bias of shape [d]), O(d * in * 8).

        With `first_row` (a multiple of 8), W holds only rows [first_row, first_row + len(W)) of the full
        weight, and gets those rows of M W.
        """
        folded = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        self.left_multiply_into(weight, folded, first_row)
        return folded

    def left_multiply_into(self, weight: torch.Tensor, target: torch.Tensor, first_row: int = 0) -> None:
        """target <- M W for rows from `first_row` on, as in `left_multiply`; `target` may be W itself."""
        columns = weight.reshape(weight.shape[0], -1)
        start = first_row // BLOCK
        blocks = self.blocks_like(weight)[start:start + columns.shape[0] // BLOCK]
        if weight.dtype != torch.float64:
            blockfold.left_multiply(columns, blocks, target.view(columns.shape))
            return
        product = torch.bmm(blocks, columns.reshape(-1, BLOCK, columns.shape[1]))
        target.copy_(product.reshape(target.shape))


@dataclass(frozen=True)
class ProjectedMap:
    """M = I + P^T C P with C = c (R - I): a rank-8 update through an 8-dim subspace."""

    projector: torch.Tensor  # [8, d], float64
    core: torch.Tensor  # [8, 8], float64
    _converted: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_generator(cls, projector: torch.Tensor, generator: torch.Tensor, strength: float) -> ProjectedMap:
        eye = torch.eye(BLOCK, dtype=torch.float64)
        return cls(projector.to(torch.float64), strength * (rotation(generator) - eye))

    @property
    def dim(self) -> int:
        return self.projector.shape[1]

    def dense(self) -> torch.Tensor:
        p = self.projector
        return torch.eye(self.dim, dtype=torch.float64) + p.T @ self.core @ p

    def _like(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (weight.dtype, weight.device)
        if key not in self._converted:
            self._converted[key] = (self.projector.to(weight.dtype).to(weight.device),
                                    self.core.to(weight.dtype).to(weight.device))
        return self._converted[key]

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """W M = W + (W P^T) C P, two thin products instead of a d x d one."""
        folded = weight.clone(memory_format=torch.contiguous_format)
        self.right_multiply_(folded)
        return folded

    def right_multiply_(self, weight: torch.Tensor) -> None:
        """W <- W M in place: the update is rank 8, so it needs no buffer of W's size."""
        p, c = self._like(weight)
        weight.addmm_((weight @ p.T) @ c, p)

    def left_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """M W = W + P^T C (P W)."""
        p, c = self._like(weight)
        columns = weight.reshape(self.dim, -1)
        return torch.addmm(columns, p.T @ c, p @ columns).reshape(weight.shape)


LinearMap = BlockDiagonalMap | ProjectedMap
