"""`verify`: prove a bake exact by comparing logits with the adapter model run by hooks.

The reference never folds anything. It loads the base model and wraps the affected
linear layers so that each adapter acts on activations, as the adapter was trained:
dense maps multiply the layer's input or output, and LoRA adds B(A x). This path shares
only the spec's site table and the map constructors with the bake, so a wrong fold,
a wrong row split or a wrong adapter order shows up as a logit difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import VerifyError
from ..manifest import Scales
from .adapters import Adapter
from .bake import load_adapters
from .layout import LM_HEAD, ModelLayout, Slot, layout_from_config
from .lora_adapter import LoraAdapter
from .maps import BlockDiagonalMap, ProjectedMap, gate_strength
from .model_dir import open_model_dir
from .so8t_adapter import So8tAdapter

# Max |Δlogit| allowed, by the baked model's weight dtype, as (absolute, relative to the largest
# reference logit). float32 must meet the spec's 1e-4 outright. A half-precision bake rounds each
# folded weight once more than the base did; about five ulps of the logit scale covers that
# (measured on tiny random models: bf16 ~0.6 %, fp16 ~0.07 % of the largest logit).
TOLERANCES = {"F32": (1e-4, 0.0), "BF16": (0.0, 2e-2), "F16": (0.0, 2.5e-3)}


class _InputMapped(nn.Module):
    """y = inner(M x), optionally only for some output rows (one part of a fused projection)."""

    def __init__(self, inner: nn.Module, matrix: torch.Tensor, rows: tuple[int, int] | None):
        super().__init__()
        self.inner, self.rows = inner, rows
        self.register_buffer("matrix", matrix.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = self.inner(x @ self.matrix.T)
        if self.rows is None:
            return mapped
        out = self.inner(x).clone()
        out[..., self.rows[0]:self.rows[1]] = mapped[..., self.rows[0]:self.rows[1]]
        return out


class _OutputMapped(nn.Module):
    """y = M inner(x): the map acts on the layer's output, bias included."""

    def __init__(self, inner: nn.Module, matrix: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("matrix", matrix.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) @ self.matrix.T


class _LowRankAdded(nn.Module):
    """y = inner(x) + scaling * B (A x), optionally into some output rows only."""

    def __init__(self, inner: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float,
                 rows: tuple[int, int] | None):
        super().__init__()
        self.inner, self.scaling, self.rows = inner, scaling, rows
        self.register_buffer("a", a.to(torch.float32), persistent=False)
        self.register_buffer("b", b.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        delta = self.scaling * ((x @ self.a.T) @ self.b.T)
        if self.rows is None:
            return out + delta
        out = out.clone()
        out[..., self.rows[0]:self.rows[1]] += delta
        return out


def _wrap(model: nn.Module, slot: Slot, make) -> None:
    path = slot.weight.removesuffix(".weight")
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, make(getattr(parent, child)))


def _attach_so8t(model: nn.Module, adapter: So8tAdapter, layout: ModelLayout, scales: Scales) -> None:
    def block(group, scale):
        if group is None or scale == 0:
            return None
        return BlockDiagonalMap.from_generators(group.generators, gate_strength(scale, group.gate)).dense()

    for layer in range(layout.num_layers):
        for rep, role in (("vector", "q"), ("spinor_plus", "k"), ("spinor_minus", "v")):
            group = adapter.triality.get((layer, rep))
            if group is not None and scales.triality != 0:
                m = ProjectedMap.from_generator(group.projector, group.generator,
                                                gate_strength(scales.triality, group.gate)).dense()
                slot = layout.projection(layer, role)
                _wrap(model, slot, lambda inner, m=m, rows=slot.rows: _InputMapped(inner, m, rows))
        if (m := block(adapter.sites.get((layer, "attn_in")), scales.rotation)) is not None:
            for slot in layout.attention_inputs(layer):
                _wrap(model, slot, lambda inner, m=m: _InputMapped(inner, m, None))
        if (m := block(adapter.sites.get((layer, "attn_out")), scales.rotation)) is not None:
            _wrap(model, layout.projection(layer, "o"), lambda inner, m=m: _OutputMapped(inner, m))
        if (m := block(adapter.sites.get((layer, "mlp_in")), scales.ffn)) is not None:
            for slot in layout.mlp_inputs(layer):
                _wrap(model, slot, lambda inner, m=m: _InputMapped(inner, m, None))
        if (m := block(adapter.sites.get((layer, "mlp_out")), scales.ffn)) is not None:
            _wrap(model, layout.projection(layer, "down"), lambda inner, m=m: _OutputMapped(inner, m))
    if (m := block(adapter.final, scales.rotation)) is not None:
        _wrap(model, Slot(LM_HEAD), lambda inner, m=m: _InputMapped(inner, m, None))


def _attach_lora(model: nn.Module, adapter: LoraAdapter, layout: ModelLayout) -> None:
    for module in adapter.modules:
        slot = layout.slot_for_module(module.module)
        if slot is None:
            raise VerifyError(f"{adapter.path}: LoRA targets {module.module!r}, which the base model does not have")
        scaling = adapter.scaling
        _wrap(model, slot, lambda inner, m=module, rows=slot.rows, s=scaling: _LowRankAdded(inner, m.a, m.b, s, rows))


def attach_adapters(model: nn.Module, adapters: Sequence[Adapter], layout: ModelLayout, scales: Scales) -> None:
    """Wrap modules so the model runs base + adapters, in order, without changing a weight."""
    for adapter in adapters:
        if isinstance(adapter, So8tAdapter):
            _attach_so8t(model, adapter, layout, scales)
        else:
            _attach_lora(model, adapter, layout)


def probe_tokens(vocab_size: int, sequences: int = 2, length: int = 24) -> torch.Tensor:
    """Fixed token ids, the same on every run and machine."""
    generator = torch.Generator().manual_seed(8)
    return torch.randint(0, vocab_size, (sequences, length), generator=generator)


def _load(path: Path) -> nn.Module:
    import transformers

    # Our output is one result line; transformers' loading bars and notices would bury it.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits.to(torch.float64)


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float  # max |adapter model - baked model| over all logits
    adapter_effect: float  # max |adapter model - base model|: how much the adapter matters
    tolerance: float
    baked_dtype: str

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def _weight_dtype(path: Path) -> str:
    dtypes = {e.dtype for shard in open_model_dir(path).shards for e in shard.tensors.values()
              if e.dtype in TOLERANCES}
    return max(dtypes, key=lambda d: TOLERANCES[d][1]) if dtypes else "F32"


def verify_bake(model_dir: Path, adapter_dirs: Sequence[tuple[str | None, Path]], baked_dir: Path,
                scales: Scales, tolerance: float | None = None) -> VerifyReport:
    """Compare the hook-evaluated adapter model with the baked model on fixed tokens."""
    model = open_model_dir(model_dir)
    layout = layout_from_config(model.config, str(model_dir / "config.json"))
    adapters = load_adapters(adapter_dirs, model)
    baked_dtype = _weight_dtype(baked_dir)
    tokens = probe_tokens(int(model.config["vocab_size"]))

    reference_model = _load(model_dir)
    base = _logits(reference_model, tokens)
    attach_adapters(reference_model, adapters, layout, scales)
    reference = _logits(reference_model, tokens)
    del reference_model  # keep at most one model in memory
    baked = _logits(_load(baked_dir), tokens)

    if tolerance is None:
        absolute, relative = TOLERANCES[baked_dtype]
        tolerance = absolute + relative * max(1.0, float(reference.abs().max()))
    return VerifyReport(
        max_abs_diff=float((reference - baked).abs().max()),
        adapter_effect=float((reference - base).abs().max()),
        tolerance=tolerance,
        baked_dtype=baked_dtype,
    )
