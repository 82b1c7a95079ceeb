"""Turn adapters into per-tensor edit lists: the bake's plan, before any weight is read.

Each output tensor gets an ordered list of edits. Adapters contribute in manifest order,
so a LoRA listed after an SO8T adapter is added to the SO8T-folded weight, exactly as if
it had been trained on top of the baked model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from ..errors import AdapterError
from ..manifest import Scales
from .adapters import Adapter
from .layout import EMBED, LM_HEAD, ModelLayout, Slot
from .lora_adapter import LoraAdapter
from .maps import BlockDiagonalMap, LinearMap, ProjectedMap, gate_strength
from .so8t_adapter import BlockGroup, So8tAdapter

_TRIALITY_ROLE = {"vector": "q", "spinor_plus": "k", "spinor_minus": "v"}


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


Edit = RightMultiply | LeftMultiply | AddLowRank


@dataclass
class BakePlan:
    edits: dict[str, list[Edit]] = field(default_factory=dict)
    untie_lm_head: bool = False  # write lm_head.weight from the (unchanged) embeddings

    def add(self, name: str, edit: Edit) -> None:
        self.edits.setdefault(name, []).append(edit)


def _block_map(group: BlockGroup | None, scale: float) -> BlockDiagonalMap | None:
    if group is None or scale == 0:
        return None  # s = 0 means M = I: skipped, so the tensor stays byte-identical
    return BlockDiagonalMap.from_generators(group.generators, gate_strength(scale, group.gate))


def _plan_so8t(plan: BakePlan, adapter: So8tAdapter, layout: ModelLayout, scales: Scales, biases: set[str]) -> None:
    def left(slot: Slot, m: LinearMap) -> None:
        plan.add(slot.weight, LeftMultiply(m))
        if slot.bias in biases:
            plan.add(slot.bias, LeftMultiply(m))

    for layer in range(layout.num_layers):
        for rep, role in _TRIALITY_ROLE.items():
            group = adapter.triality.get((layer, rep))
            if group is not None and scales.triality != 0:
                m = ProjectedMap.from_generator(
                    group.projector, group.generator, gate_strength(scales.triality, group.gate)
                )
                slot = layout.projection(layer, role)
                plan.add(slot.weight, RightMultiply(m, slot.rows))
        if m := _block_map(adapter.sites.get((layer, "attn_in")), scales.rotation):
            for slot in layout.attention_inputs(layer):
                plan.add(slot.weight, RightMultiply(m))
        if m := _block_map(adapter.sites.get((layer, "attn_out")), scales.rotation):
            left(layout.projection(layer, "o"), m)
        if m := _block_map(adapter.sites.get((layer, "mlp_in")), scales.ffn):
            for slot in layout.mlp_inputs(layer):
                plan.add(slot.weight, RightMultiply(m))
        if m := _block_map(adapter.sites.get((layer, "mlp_out")), scales.ffn):
            left(layout.projection(layer, "down"), m)
    if m := _block_map(adapter.final, scales.rotation):
        plan.add(LM_HEAD, RightMultiply(m))


def _plan_lora(plan: BakePlan, adapter: LoraAdapter, layout: ModelLayout, shapes: dict[str, tuple[int, ...]]) -> None:
    # PEFT applies fan_in_fan_out only to Conv1D layers (GPT-2 style [in, out] weights) and
    # resets it for nn.Linear; every architecture we bake uses nn.Linear, so B A is [out, in].
    where = adapter.path
    for module in adapter.modules:
        slot = layout.slot_for_module(module.module)
        if slot is None or slot.weight not in shapes:
            raise AdapterError(f"{where}: LoRA targets {module.module!r}, which the base model does not have")
        out_dim, in_dim = shapes[slot.weight]
        rows = slot.rows or (0, out_dim)
        expected = (rows[1] - rows[0], in_dim)
        got = (module.b.shape[0], module.a.shape[1])
        if got != expected:
            raise AdapterError(f"{where}: LoRA for {module.module!r} has shape {list(got)}, expected {list(expected)}")
        plan.add(slot.weight, AddLowRank(module.a, module.b, adapter.scaling, slot.rows))


def plan_bake(layout: ModelLayout, shapes: dict[str, tuple[int, ...]], adapters: Sequence[Adapter],
              scales: Scales) -> BakePlan:
    """Edits for every tensor the adapters touch; `shapes` are the base checkpoint's tensors."""
    plan = BakePlan()
    tied = LM_HEAD not in shapes
    shapes = dict(shapes)
    if tied:
        shapes[LM_HEAD] = shapes[EMBED]
    biases = {name for name in shapes if name.endswith(".bias")}
    for adapter in adapters:
        if isinstance(adapter, So8tAdapter):
            _plan_so8t(plan, adapter, layout, scales, biases)
        else:
            _plan_lora(plan, adapter, layout, shapes)
    plan.untie_lm_head = tied and LM_HEAD in plan.edits
    return plan


def apply_edits(weight: torch.Tensor, edits: Sequence[Edit]) -> torch.Tensor:
    """Apply edits in order to a whole float32 tensor (a weight matrix or a bias vector)."""
    return _apply_to_rows(weight, edits, 0, weight.shape[0])


def fold_in_chunks(weight: torch.Tensor, edits: Sequence[Edit], out_dtype: torch.dtype,
                   chunk_bytes: int = 2 << 20, executor: Executor | None = None) -> Iterator[torch.Tensor]:
    """Yield the edited tensor a few rows at a time, each block folded in float32 and cast to out_dtype.

    Every edit here acts on rows independently (input-side maps, LoRA) or within aligned groups
    of 8 rows (output-side block maps), so row chunks that start at multiples of 8 can be
    edited on their own. Small float32 chunks stay in the CPU cache (a whole-tensor fold is
    2-3x slower, bound by memory traffic), and with an executor they fold in parallel while
    the caller writes the finished ones, in order.
    """
    whole_tensor = weight.dim() == 1 or any(
        isinstance(e, LeftMultiply) and not isinstance(e.map, BlockDiagonalMap) for e in edits
    )
    if whole_tensor:
        yield apply_edits(weight.to(torch.float32, copy=True), edits).to(out_dtype)
        return
    rows = weight.shape[0]
    step = max(8, chunk_bytes // (4 * weight.shape[1]) // 8 * 8)

    def fold(start: int) -> torch.Tensor:
        stop = min(rows, start + step)
        chunk = weight[start:stop].to(torch.float32, copy=True)
        return _apply_to_rows(chunk, edits, start, stop).to(out_dtype)

    starts = range(0, rows, step)
    yield from (executor.map(fold, starts) if executor else map(fold, starts))


def _apply_to_rows(chunk: torch.Tensor, edits: Sequence[Edit], start: int, stop: int) -> torch.Tensor:
    """Apply edits to rows [start, stop) of a tensor, held in `chunk` (float32, edited in place)."""
    for edit in edits:
        if isinstance(edit, LeftMultiply):
            m = edit.map
            if isinstance(m, BlockDiagonalMap):
                m = BlockDiagonalMap(m.blocks[start // 8:(stop + 7) // 8])
            chunk = m.left_multiply(chunk)
            continue
        first, last = edit.rows or (0, stop)
        lo, hi = max(first, start), min(last, stop)
        if lo >= hi:
            continue
        target = chunk[lo - start:hi - start]
        if isinstance(edit, RightMultiply):
            target.copy_(edit.map.right_multiply(target))
        else:
            target.add_(edit.delta_rows(lo - first, hi - first))
    return chunk
