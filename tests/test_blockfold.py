"""The compiled block-fold kernel against its torch reference: the same bits, for every dtype pair and shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from so8t_deploy.bake import blockfold
from so8t_deploy.bake.maps import BlockDiagonalMap

IMPLEMENTATIONS = blockfold.implementations()
DTYPES = (torch.float32, torch.bfloat16)


def _blocks(n: int, seed: int) -> torch.Tensor:
    generators = torch.randn(n, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.4
    return BlockDiagonalMap.from_generators(generators, 0.8).blocks


def _weight(rows: int, cols: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def _all(fold, source: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    results = {}
    for implementation in IMPLEMENTATIONS:
        target = torch.full(source.shape, float("nan"), dtype=dtype)
        fold(source, blocks, target, implementation)
        results[implementation] = target
    return results


def _assert_same_bits(results: dict[str, torch.Tensor]) -> None:
    reference = results["torch"].view(torch.int16 if results["torch"].dtype == torch.bfloat16 else torch.int32)
    for implementation, result in results.items():
        assert torch.equal(result.view(reference.dtype), reference), implementation


def test_the_kernel_is_built_and_vectorized_where_the_cpu_can():
    assert blockfold.compiled(), "so8t_deploy/bake/_blockfold.c was not built: pip install -e . needs a C compiler"
    flags = set(next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "").split())
    avx2 = {"avx2", "fma"} <= flags
    avx512 = avx2 and {"avx512f", "avx512vl", "avx512bw"} <= flags
    assert blockfold._blockfold.level() == avx2 + avx512
    assert blockfold.implementations() == ("avx512", "avx2", "scalar", "torch")[2 - avx2 - avx512:]


@pytest.mark.parametrize("source_dtype", DTYPES)
@pytest.mark.parametrize("target_dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 8), (3, 24), (5, 64), (40, 3072)])
def test_right_multiply_is_the_same_bits_everywhere(source_dtype, target_dtype, rows, cols):
    blocks = blockfold.exact_blocks(_blocks(cols // 8, seed=rows))
    source = _weight(rows, cols, source_dtype)
    results = _all(blockfold.right_multiply, source, blocks, target_dtype)
    _assert_same_bits(results)
    dense = source.double() @ torch.block_diag(*blocks)
    tolerance = 1e-2 if target_dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(results[IMPLEMENTATIONS[0]].double(), dense, atol=tolerance * dense.abs().max().item())


@pytest.mark.parametrize("source_dtype", DTYPES)
@pytest.mark.parametrize("target_dtype", DTYPES)
# Column counts around the kernel's 4-wide vectors and 256-wide panels, and down_proj's 4 KiB-multiple stride.
@pytest.mark.parametrize("rows, cols", [(8, 1), (8, 7), (16, 13), (24, 256), (8, 261), (16, 8192)])
def test_left_multiply_is_the_same_bits_everywhere(source_dtype, target_dtype, rows, cols):
    blocks = blockfold.exact_blocks(_blocks(rows // 8, seed=cols))
    source = _weight(rows, cols, source_dtype)
    results = _all(blockfold.left_multiply, source, blocks, target_dtype)
    _assert_same_bits(results)
    dense = torch.block_diag(*blocks) @ source.double()
    tolerance = 1e-2 if target_dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(results[IMPLEMENTATIONS[0]].double(), dense, atol=tolerance * dense.abs().max().item())


@pytest.mark.parametrize("fold", [blockfold.right_multiply, blockfold.left_multiply])
def test_folds_in_place_equal_folds_out_of_place(fold):
    blocks = blockfold.exact_blocks(_blocks(2, seed=3))
    for implementation in IMPLEMENTATIONS:
        source = _weight(16, 16, torch.bfloat16)
        expected = torch.empty_like(source)
        fold(source, blocks, expected, implementation)
        fold(source, blocks, source, implementation)
        assert torch.equal(source, expected), implementation


def _bf16(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int16).view(torch.bfloat16)


def test_rounding_at_the_edges_matches_torch():
    """Ties to even, subnormals, signed zeros and overflow to inf: each path rounds as torch does."""
    edges = _bf16([0x0001, 0x8001 - 0x10000, 0x007f, 0x3f81, 0xbf81 - 0x10000, 0x7f7f, 0xff7f - 0x10000, 0x0000,
                   0x8000 - 0x10000, 0x3c01, 0x4049, 0x0080, 0x3f80, 0x3f7f, 0x0100, 0x8080 - 0x10000])
    source = torch.stack([edges.roll(r) for r in range(8)])
    # Halves on the diagonal and above it give sums that land exactly on float32 and bfloat16 ties.
    block = torch.eye(8, dtype=torch.float64) * 0.5 + torch.diag(torch.full((7,), 0.5, dtype=torch.float64), 1)
    for fold, blocks in ((blockfold.right_multiply, torch.stack([block, 3 * block])),
                         (blockfold.left_multiply, torch.stack([3 * block]))):
        for dtype in DTYPES:
            results = _all(fold, source, blocks, dtype)
            _assert_same_bits(results)
            assert results["torch"].isinf().any()  # the overflow case is really exercised


def test_non_finite_inputs_stay_non_finite():
    """The bake refuses non-finite weights before it folds; should one get through, it is not made finite."""
    source = _weight(8, 16, torch.bfloat16)
    source[2, 3], source[5, 9] = float("nan"), float("inf")
    blocks = blockfold.exact_blocks(_blocks(2, seed=4))
    for fold in (blockfold.right_multiply, blockfold.left_multiply):
        results = _all(fold, source, blocks[:1] if fold is blockfold.left_multiply else blocks, torch.bfloat16)
        for result in results.values():
            assert torch.equal(result.isfinite(), results["torch"].isfinite())


def test_views_and_other_devices_take_the_torch_path_with_the_same_bits():
    blocks = blockfold.exact_blocks(_blocks(4, seed=5))
    base = _weight(12, 64, torch.float32)
    strided = base[:, ::2]  # not row-contiguous: the kernel does not apply
    expected = torch.empty(strided.shape)
    blockfold.right_multiply(strided.contiguous(), blocks, expected, IMPLEMENTATIONS[0])
    result = torch.empty(strided.shape)
    blockfold.right_multiply(strided, blocks, result)
    assert torch.equal(result, expected)
    with pytest.raises(ValueError, match="does not run here"):
        blockfold.right_multiply(strided, blocks, result, "scalar")


def test_shapes_that_do_not_fit_are_refused():
    blocks = blockfold.exact_blocks(_blocks(2, seed=6))
    with pytest.raises(ValueError, match="block fold"):
        blockfold.right_multiply(_weight(4, 24, torch.float32), blocks, torch.empty(4, 24))
    with pytest.raises(ValueError, match="block fold"):
        blockfold.left_multiply(_weight(8, 4, torch.float32), blocks, torch.empty(8, 4))
    with pytest.raises(ValueError, match="block fold"):
        blockfold.right_multiply(_weight(4, 16, torch.float32), blocks, torch.empty(4, 8))


def test_float16_and_float64_fold_through_torch():
    """float16 has no kernel and goes through the reference; float64 weights keep float64 blocks (maps.py)."""
    m = BlockDiagonalMap.from_generators(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(7)), 0.5)
    half = _weight(4, 16, torch.float16)
    folded = m.right_multiply(half)
    assert folded.dtype == torch.float16
    reference = torch.empty(4, 16, dtype=torch.float32)
    blockfold.right_multiply(half.float(), blockfold.exact_blocks(m.blocks), reference, "torch")
    assert torch.equal(folded, reference.half())
    wide = _weight(4, 16, torch.float64)
    assert torch.allclose(m.right_multiply(wide), wide @ m.dense(), atol=1e-15)
