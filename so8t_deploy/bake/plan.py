"""The bake's plan: for every output tensor, where its bytes start from and which edits follow.

Built before any weight is read. Adapters contribute in manifest order, each on top of the
model the earlier ones produced: a LoRA listed after an SO8T adapter is added to the
SO8T-folded weight, exactly as if it had been trained on the baked model.

A tensor starts from the base checkpoint, from a whole tensor an adapter saved (which
drops every earlier edit), or from zeros (a bias the base never had). A base that ties its
embeddings has one matrix for both ends; the plan keeps it shared until an adapter treats
the two ends differently, and from then on writes an untied lm_head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AdapterError
from .edits import Edit
from .layout import EMBED, LM_HEAD, ModelLayout, Slot
from .lora_adapter import LoraAdapter, TensorRef


@dataclass(frozen=True)
class BaseTensor:
    """A tensor of the base checkpoint, by name."""

    name: str


@dataclass(frozen=True)
class Zeros:
    """A tensor the base lacks, starting at zero (a bias that an architecture flag switches on)."""

    shape: tuple[int, ...]
    dtype: str = "F32"

    def read(self) -> torch.Tensor:
        return torch.zeros(math.prod(self.shape) * 4, dtype=torch.uint8)


Source = BaseTensor | TensorRef | Zeros


@dataclass
class TensorPlan:
    source: Source
    shape: tuple[int, ...]
    like: str  # the base tensor whose dtype this output keeps
    edits: list[Edit] = field(default_factory=list)
    after: str | None = None  # a tensor the base lacks is written right after this one


@dataclass
class BakePlan:
    """What the planners produce; `tensors` holds only the tensors that differ from the base."""

    base_shapes: dict[str, tuple[int, ...]]
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    tied: bool = False  # lm_head is still the embedding matrix (the base ties them and nothing split them)
    config_updates: dict[str, Any] = field(default_factory=dict)
    vocabulary_from: LoraAdapter | None = None  # the adapter that resized the embeddings last

    @classmethod
    def for_base(cls, shapes: dict[str, tuple[int, ...]]) -> BakePlan:
        return cls(dict(shapes), tied=LM_HEAD not in shapes and EMBED in shapes)

    @property
    def untie_lm_head(self) -> bool:
        """Write an lm_head.weight the base checkpoint does not have."""
        return LM_HEAD not in self.base_shapes and not self.tied

    @property
    def edits(self) -> dict[str, list[Edit]]:
        return {name: plan.edits for name, plan in self.tensors.items() if plan.edits}

    def _resolve(self, name: str) -> str:
        return EMBED if name == LM_HEAD and self.tied else name

    def shape(self, name: str) -> tuple[int, ...] | None:
        name = self._resolve(name)
        return self.tensors[name].shape if name in self.tensors else self.base_shapes.get(name)

    def has(self, name: str) -> bool:
        return self.shape(name) is not None

    def require_shape(self, name: str, where: str) -> tuple[int, ...]:
        """The shape of a tensor that `where` needs; a base model without it is refused."""
        shape = self.shape(name)
        if shape is None:
            raise AdapterError(f"{where}: needs {name!r}, which the base model does not have")
        return shape

    def _entry(self, name: str) -> TensorPlan:
        if name not in self.tensors:
            self.tensors[name] = TensorPlan(BaseTensor(name), self.base_shapes[name], like=name)
        return self.tensors[name]

    def untie(self) -> None:
        """Give lm_head its own copy of the shared matrix's plan, so the two ends can differ."""
        if self.tied:
            embed = self._entry(EMBED)
            self.tensors[LM_HEAD] = TensorPlan(embed.source, embed.shape, EMBED, list(embed.edits), after=EMBED)
            self.tied = False

    def add(self, name: str, edit: Edit) -> None:
        if name in (EMBED, LM_HEAD):
            self.untie()  # an edit to one end of a tied pair leaves the other as it was
        self._entry(name).edits.append(edit)

    def replace(self, name: str, source: TensorRef, shared: bool = False) -> None:
        """Start `name` over from `source`; `shared` replaces the tied matrix at both ends while they are tied."""
        if name in (EMBED, LM_HEAD) and not shared:
            self.untie()
        plan = self._entry(self._resolve(name))
        plan.source, plan.shape = source, source.shape
        plan.edits.clear()

    def create(self, name: str, shape: tuple[int, ...], after: str) -> None:
        self.tensors[name] = TensorPlan(Zeros(shape), shape, like=after, after=after)


def check_shape(plan: BakePlan, name: str, shape: tuple[int, ...], where: str) -> None:
    """A replacement keeps its tensor's shape; only the embeddings may change their vocabulary rows."""
    current = plan.shape(name)
    if current is None:
        raise AdapterError(f"{where}: replaces {name!r}, which the base model does not have")
    same = shape == current or (name in (EMBED, LM_HEAD) and len(shape) == 2 and shape[1:] == current[1:])
    if not same:
        raise AdapterError(f"{where}: {name!r} has shape {list(shape)}, the base model's is {list(current)}")


# Biases an architecture can switch on, by config flag: the projections each flag gives a bias to.
BIAS_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")},
}
# Flags transformers has but llama.cpp cannot follow: attention_bias also gives o_proj a bias, which llama.cpp's
# graph for these families has no slot for (its loader stops at "wrong number of tensors"). Never switched on.
UNLOADABLE_BIAS_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    model_type: {"attention_bias": ("q", "k", "v", "o")} for model_type in ("qwen3", "gemma2", "gemma3_text")
}


def ensure_bias(plan: BakePlan, layout: ModelLayout, slot: Slot, module: str, where: str) -> None:
    """Make sure `slot` has a bias tensor, switching on the config flag that creates it where needed.

    The flag gives a bias to the same projections of every layer, so each of those gets a zero
    bias too: transformers and llama.cpp then load the checkpoint, and zeros change nothing.
    """
    if plan.has(slot.bias):
        return
    for flag, roles in BIAS_FLAGS.get(layout.model_type, {}).items():
        group = [layout.projection(layer, role) for layer in range(layout.num_layers) for role in roles]
        if slot.weight not in {other.weight for other in group}:
            continue
        for other in group:
            if not plan.has(other.bias):
                plan.create(other.bias, (plan.require_shape(other.weight, where)[0],), after=other.weight)
        plan.config_updates[flag] = True
        return
    for flag, roles in UNLOADABLE_BIAS_FLAGS.get(layout.model_type, {}).items():
        if slot.weight in {layout.projection(layer, role).weight for layer in range(layout.num_layers)
                           for role in roles}:
            raise AdapterError(f"{where}: {module!r} gets a LoRA bias, but {layout.model_type} has no bias on that "
                               f"projection, and its config flag {flag} would give o_proj a bias, which llama.cpp's "
                               f"{layout.model_type} does not load")
    raise AdapterError(f"{where}: {module!r} gets a LoRA bias, but {layout.model_type} has no bias on that "
                       "projection and no config flag that adds one")
