"""SO8T maps and their folds into weight matrices: small, pure tensor functions.

Column-vector convention, as in docs/so8t-adapter-v1: a map turns a hidden vector x into
M x, and a linear layer computes y = W x + b with W of shape [out, in]. Folding a map that
acts on a layer's input is W <- W M; one that acts on its output is W <- M W, b <- M b.

Nothing here ever forms a dense d x d matrix except `dense()`, which tests and the
hook-based reference evaluator use to check the folds against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK = 8


def rotation(generator: torch.Tensor) -> torch.Tensor:
    """R = expm(G - G^T) in float64, batched over leading axes; R is in SO(8) by construction."""
    g = generator.to(torch.float64)
    return torch.linalg.matrix_exp(g - g.transpose(-1, -2))


def gate_strength(scale: float, gate_logit: float) -> float:
    """The coefficient s * sigmoid(g) that blends a rotation with the identity."""
    return scale / (1.0 + math.exp(-gate_logit))


@dataclass(frozen=True)
class BlockDiagonalMap:
    """M = blockdiag(B_1, ..., B_{d/8}), where B_b = I + c (R_b - I)."""

    blocks: torch.Tensor  # [d/8, 8, 8], float64

    @classmethod
    def from_generators(cls, generators: torch.Tensor, strength: float) -> BlockDiagonalMap:
        eye = torch.eye(BLOCK, dtype=torch.float64)
        return cls(eye + strength * (rotation(generators) - eye))

    @property
    def dim(self) -> int:
        return self.blocks.shape[0] * BLOCK

    def dense(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks)

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """W M for W of shape [out, d]: one batched 8x8 product per block, O(out * d * 8)."""
        out = weight.shape[0]
        blocks = self.blocks.to(weight.dtype)
        # [out, nb, 8] -> [nb, out, 8] @ [nb, 8, 8] -> back to [out, d]
        folded = torch.bmm(weight.reshape(out, -1, BLOCK).transpose(0, 1), blocks)
        return folded.transpose(0, 1).reshape(out, self.dim)

    def left_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """M W for W of shape [d, in] (or a bias of shape [d]), O(d * in * 8)."""
        blocks = self.blocks.to(weight.dtype)
        columns = weight.reshape(self.dim, -1)
        folded = torch.bmm(blocks, columns.reshape(-1, BLOCK, columns.shape[1]))
        return folded.reshape(weight.shape)


@dataclass(frozen=True)
class ProjectedMap:
    """M = I + P^T C P with C = c (R - I): a rank-8 update through an 8-dim subspace."""

    projector: torch.Tensor  # [8, d], float64
    core: torch.Tensor  # [8, 8], float64

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

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """W M = W + (W P^T) C P, two thin products instead of a d x d one."""
        p, c = self.projector.to(weight.dtype), self.core.to(weight.dtype)
        return torch.addmm(weight, (weight @ p.T) @ c, p)

    def left_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """M W = W + P^T C (P W)."""
        p, c = self.projector.to(weight.dtype), self.core.to(weight.dtype)
        columns = weight.reshape(self.dim, -1)
        return torch.addmm(columns, p.T @ c, p @ columns).reshape(weight.shape)


LinearMap = BlockDiagonalMap | ProjectedMap
