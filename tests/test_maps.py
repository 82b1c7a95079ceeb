"""The SO8T map constructors and folds, checked against dense d x d matrices."""

from __future__ import annotations

import math

import pytest
import torch

from so8t_deploy.bake.maps import BlockDiagonalMap, ProjectedMap, gate_strength, rotation

D = 32


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_rotation_is_special_orthogonal(gen):
    r = rotation(torch.randn(5, 8, 8, generator=gen))
    eye = torch.eye(8, dtype=torch.float64)
    assert r.dtype == torch.float64
    assert torch.allclose(r @ r.transpose(-1, -2), eye.expand(5, 8, 8), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(5, dtype=torch.float64), atol=1e-12)


def test_rotation_uses_only_the_skew_part(gen):
    g = torch.randn(8, 8, generator=gen)
    symmetric = torch.randn(8, 8, generator=gen)
    symmetric = symmetric + symmetric.T
    assert torch.allclose(rotation(g), rotation(g + symmetric), atol=1e-12)


def test_block_map_dense_layout(gen):
    m = BlockDiagonalMap.from_generators(torch.randn(D // 8, 8, 8, generator=gen), 0.6)
    dense = m.dense()
    r = rotation(torch.randn(D // 8, 8, 8, generator=torch.Generator().manual_seed(0)))
    eye = torch.eye(8, dtype=torch.float64)
    assert torch.allclose(dense[8:16, 8:16], eye + 0.6 * (r[1] - eye))
    assert dense[0:8, 8:16].abs().max() == 0  # block-diagonal: block b acts on channels [8b, 8b+8)


@pytest.mark.parametrize("out_dim", [1, 24, 40])
def test_block_map_folds_match_dense(gen, out_dim):
    m = BlockDiagonalMap.from_generators(torch.randn(D // 8, 8, 8, generator=gen), 0.7)
    dense = m.dense()
    w_in = torch.randn(out_dim, D, generator=gen, dtype=torch.float64)
    assert torch.allclose(m.right_multiply(w_in), w_in @ dense, atol=1e-12)
    w_out = torch.randn(D, out_dim, generator=gen, dtype=torch.float64)
    assert torch.allclose(m.left_multiply(w_out), dense @ w_out, atol=1e-12)
    bias = torch.randn(D, generator=gen, dtype=torch.float64)
    assert torch.allclose(m.left_multiply(bias), dense @ bias, atol=1e-12)


def test_projected_map_folds_match_dense(gen):
    projector, generator = torch.randn(8, D, generator=gen), torch.randn(8, 8, generator=gen)
    m = ProjectedMap.from_generator(projector, generator, 0.4)
    p, eye8 = projector.double(), torch.eye(8, dtype=torch.float64)
    dense = m.dense()
    assert torch.allclose(dense, torch.eye(D, dtype=torch.float64) + 0.4 * p.T @ (rotation(generator) - eye8) @ p)
    w = torch.randn(24, D, generator=gen, dtype=torch.float64)
    assert torch.allclose(m.right_multiply(w), w @ dense, atol=1e-12)
    w = torch.randn(D, 24, generator=gen, dtype=torch.float64)
    assert torch.allclose(m.left_multiply(w), dense @ w, atol=1e-12)


def test_float32_folds_stay_float32_and_close(gen):
    m = BlockDiagonalMap.from_generators(torch.randn(D // 8, 8, 8, generator=gen), 1.0)
    w = torch.randn(16, D, generator=gen)
    folded = m.right_multiply(w)
    assert folded.dtype == torch.float32
    assert torch.allclose(folded.double(), w.double() @ m.dense(), atol=1e-5)


def test_zero_strength_is_identity(gen):
    m = BlockDiagonalMap.from_generators(torch.randn(D // 8, 8, 8, generator=gen), gate_strength(0.0, 3.0))
    assert torch.equal(m.dense(), torch.eye(D, dtype=torch.float64))


def test_gate_strength_is_scaled_sigmoid():
    assert gate_strength(1.0, 0.0) == pytest.approx(0.5)
    assert gate_strength(0.1, 2.0) == pytest.approx(0.1 / (1 + torch.exp(torch.tensor(-2.0)).item()))


def test_golden_sign_convention_of_a_single_generator_entry():
    """Pinned independently of verify: G with one entry theta at [0, 1] is the plane rotation
    [[cos theta, sin theta], [-sin theta, cos theta]] on channels 0 and 1, and the identity elsewhere."""
    theta = 0.3
    generator = torch.zeros(8, 8, dtype=torch.float64)
    generator[0, 1] = theta
    expected = torch.eye(8, dtype=torch.float64)
    expected[:2, :2] = torch.tensor([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    assert torch.allclose(rotation(generator), expected, atol=1e-15)
    x = torch.zeros(8, dtype=torch.float64)
    x[1] = 1.0  # M x with the column-vector convention: e_1 goes to (sin theta, cos theta)
    assert torch.allclose((rotation(generator) @ x)[:2], torch.tensor([math.sin(theta), math.cos(theta)],
                                                                       dtype=torch.float64))
