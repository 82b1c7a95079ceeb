"""The LoRA-variant folds as pure tensor functions, against dense formulas, chunk by chunk."""

from __future__ import annotations

import pytest
import torch

from so8t_deploy.bake.edits import (
    AddLowRank,
    AddVector,
    DoraLowRank,
    RightMultiply,
    ScaleColumnsToNorm,
    apply_edits,
    fold_in_chunks,
)
from so8t_deploy.bake.layout import EMBED, LM_HEAD
from so8t_deploy.bake.maps import BlockDiagonalMap
from so8t_deploy.bake.peft_config import pattern_key
from so8t_deploy.bake.plan import BakePlan, Zeros

GEN = torch.Generator().manual_seed(11)


def randn(*shape):
    return torch.randn(shape, generator=GEN, dtype=torch.float32)


def folded(weight, edits, chunk_bytes):
    """The streaming path: row chunks of `chunk_bytes`, concatenated."""
    return torch.cat(list(fold_in_chunks(weight, edits, torch.float32, chunk_bytes=chunk_bytes)))


@pytest.mark.parametrize("chunk_bytes", [64 * 4 * 8, 1 << 20], ids=["8-row-chunks", "one-chunk"])
def test_dora_renormalises_each_row_after_earlier_edits(chunk_bytes):
    w, m = randn(48, 64), BlockDiagonalMap.from_generators(0.3 * randn(8, 8, 8), 0.7)
    a, b, magnitude = randn(4, 64), randn(16, 4), randn(16).abs() + 0.5
    rows = (16, 32)  # one part of a fused projection
    edits = [RightMultiply(m), DoraLowRank(a, b, 0.5, rows, magnitude=magnitude)]

    expected = w @ m.dense().float()
    part = expected[16:32] + 0.5 * b @ a
    expected[16:32] = magnitude[:, None] * part / part.norm(dim=1, keepdim=True)
    torch.testing.assert_close(folded(w, edits, chunk_bytes), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[16:32], (w @ m.dense().float())[16:32] + 0.5 * b @ a, atol=1e-3)


@pytest.mark.parametrize("chunk_bytes", [64 * 4 * 8, 1 << 20], ids=["8-row-chunks", "one-chunk"])
def test_embedding_dora_normalises_columns_over_the_whole_vocabulary(chunk_bytes):
    """PEFT's embedding DoRA: E' = (E + s (BA)^T) * m / ||E + s (BA)^T||, the norm per hidden column."""
    e, lora_a, lora_b, magnitude = randn(40, 64), randn(4, 40), randn(64, 4), randn(64).abs() + 0.5
    edits = [AddLowRank(lora_b.T, lora_a.T, 2.0), ScaleColumnsToNorm(magnitude)]

    summed = e + 2.0 * (lora_b @ lora_a).T
    expected = summed * (magnitude / summed.norm(dim=0))
    torch.testing.assert_close(folded(e, edits, chunk_bytes), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_edits(e.clone(), edits), expected, rtol=1e-5, atol=1e-5)


def test_lora_bias_is_added_to_its_rows_only():
    bias = randn(24)
    out = apply_edits(bias.clone(), [AddVector(torch.ones(8), (8, 16))])
    torch.testing.assert_close(out, bias + torch.cat([torch.zeros(8), torch.ones(8), torch.zeros(8)]))


@pytest.mark.parametrize("module", [
    "model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    "model.layers.1.mlp.gate_up_proj", "lm_head", "model.embed_tokens",
])
def test_pattern_keys_match_as_peft_matches_them(module):
    from peft.utils.other import get_pattern_key

    patterns = {r"layers\.1\.self_attn\.q_proj": 1, "q_proj": 2, "down_proj": 3, r"layers\.1\..*": 4, "head": 5,
                "embed_tokens": 6}
    peft_key = get_pattern_key(patterns.keys(), module)
    assert pattern_key(patterns, module) == (peft_key if peft_key in patterns else None)


def test_tied_embeddings_stay_shared_until_one_end_changes():
    plan = BakePlan.for_base({EMBED: (10, 8)})
    assert plan.tied and plan.shape(LM_HEAD) == (10, 8)

    class Saved:  # stands in for a tensor an adapter saved (the resized embedding matrix)
        shape = (12, 8)

    plan.replace(EMBED, Saved(), shared=True)  # the matrix both ends use
    assert plan.tied and plan.shape(LM_HEAD) == (12, 8) and not plan.untie_lm_head
    plan.add(EMBED, AddLowRank(randn(2, 8), randn(12, 2), 1.0))  # a LoRA on the embedding only
    assert not plan.tied and plan.untie_lm_head
    assert plan.tensors[LM_HEAD].source is plan.tensors[EMBED].source  # the head keeps the saved matrix
    assert plan.tensors[LM_HEAD].edits == [] and len(plan.tensors[EMBED].edits) == 1


def test_created_bias_starts_at_zero():
    assert torch.equal(Zeros((6,)).read().view(torch.float32), torch.zeros(6))
