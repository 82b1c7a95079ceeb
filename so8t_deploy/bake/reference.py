"""The adapter model that `verify` compares a bake against, built without folding anything.

SO8T maps act on activations through wrappers (dense maps on a layer's input or output).
A PEFT LoRA, of any variant we fold, is attached by PEFT itself when it is installed, and
the reference is PEFT's own forward of the unmerged model. Without PEFT, plain LoRA pairs
are added by a wrapper (y += s B A x); the other variants need PEFT to be checked.

A chain is built in manifest order. Between two adapters the wrapped layers are replaced by
plain ones whose weights are read off the wrappers' forward (the response to the identity
matrix, or to every token id): the next adapter then sees a plain model, as it would after
the bake, while every number still comes from the adapters' own forward code.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import VerifyError
from ..manifest.schema import Scales
from .adapters import Adapter
from .layout import EMBED, LM_HEAD, ModelLayout, Slot
from .lora_adapter import LoraAdapter
from .maps import BlockDiagonalMap, ProjectedMap, gate_strength
from .so8t_adapter import BlockGroup, So8tAdapter

if TYPE_CHECKING:  # transformers is imported where it is used: the control plane runs without it
    from transformers import PreTrainedModel


class _InputMapped(nn.Module):
    """y = inner(M x), optionally only for some output rows (one part of a fused projection)."""

    matrix: torch.Tensor  # a buffer: declared so that it is typed as a tensor, not a submodule

    def __init__(self, inner: nn.Module, matrix: torch.Tensor, rows: tuple[int, int] | None):
        super().__init__()
        self.inner, self.rows = inner, rows
        self.register_buffer("matrix", matrix.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped: torch.Tensor = self.inner(x @ self.matrix.T)
        if self.rows is None:
            return mapped
        out: torch.Tensor = self.inner(x).clone()
        out[..., self.rows[0]:self.rows[1]] = mapped[..., self.rows[0]:self.rows[1]]
        return out


class _OutputMapped(nn.Module):
    """y = M inner(x): the map acts on the layer's output, bias included."""

    matrix: torch.Tensor  # a buffer

    def __init__(self, inner: nn.Module, matrix: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("matrix", matrix.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x) @ self.matrix.T
        return out


class _LowRankAdded(nn.Module):
    """y = inner(x) + scaling * B (A x), optionally into some output rows only."""

    a: torch.Tensor  # buffers
    b: torch.Tensor

    def __init__(self, inner: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float,
                 rows: tuple[int, int] | None):
        super().__init__()
        self.inner, self.scaling, self.rows = inner, scaling, rows
        self.register_buffer("a", a.to(torch.float32), persistent=False)
        self.register_buffer("b", b.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        delta = self.scaling * ((x @ self.a.T) @ self.b.T)
        if self.rows is None:
            return out + delta
        out = out.clone()
        out[..., self.rows[0]:self.rows[1]] += delta
        return out


def _wrap(model: nn.Module, slot: Slot, make: Callable[..., nn.Module]) -> None:
    """Replace the layer at `slot` by make(layer); `make` is called with that one argument (callers bind
    what else they need as lambda defaults, which is why its type says `...`)."""
    path = slot.weight.removesuffix(".weight")
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, make(getattr(parent, child)))


def _attach_so8t(model: nn.Module, adapter: So8tAdapter, layout: ModelLayout, scales: Scales) -> None:
    def block(group: BlockGroup | None, scale: float) -> torch.Tensor | None:
        if group is None or scale == 0:
            return None
        return BlockDiagonalMap.from_generators(group.generators, gate_strength(scale, group.gate)).dense()

    m: torch.Tensor | None  # a triality map, then each site's map (None: no map there)
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


def _attach_lora_hooks(model: nn.Module, adapter: LoraAdapter, layout: ModelLayout) -> None:
    if adapter.replacements or any(m.embedding or m.magnitude is not None or m.bias is not None
                                   for m in adapter.modules):
        raise VerifyError(f"{adapter.path}: uses {', '.join(adapter.config.features) or 'saved tensors'}; "
                          "verifying it needs peft (pip install peft), whose own forward is the reference")
    for module in adapter.modules:
        slot = layout.slot_for_module(module.module)
        if slot is None:
            raise VerifyError(f"{adapter.path}: LoRA targets {module.module!r}, which the base model does not have")
        _wrap(model, slot, lambda inner, m=module, rows=slot.rows: _LowRankAdded(inner, m.a, m.b, m.scaling, rows))


def attach_adapters(model: nn.Module, adapters: Sequence[Adapter], layout: ModelLayout, scales: Scales) -> None:
    """Wrap modules so the model runs base + adapters, in order, without changing a weight (no PEFT)."""
    for adapter in adapters:
        if isinstance(adapter, So8tAdapter):
            _attach_so8t(model, adapter, layout, scales)
        else:
            _attach_lora_hooks(model, adapter, layout)


def _peft_can_attach(model: nn.Module, adapter: LoraAdapter) -> bool:
    """PEFT needs peft installed and the adapter's module names in the model (not so for q_proj on Phi-3's qkv)."""
    if importlib.util.find_spec("peft") is None:
        return False
    names = {name for name, _ in model.named_modules()}
    return all(m.module in names for m in adapter.modules)


def _attach_peft(model: PreTrainedModel, adapter: LoraAdapter) -> nn.Module:
    import peft

    for replacement in adapter.replacements:
        if replacement.tensor == EMBED and replacement.ref.shape[0] != model.get_input_embeddings().num_embeddings:
            # As the trainer did before training: PEFT then loads the saved rows into the resized matrix.
            model.resize_token_embeddings(replacement.ref.shape[0], mean_resizing=False)
    return peft.PeftModel.from_pretrained(model, adapter.path).eval()


def _linear_and_embedding_paths(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Every linear and embedding layer by path, with its exact class (Gemma's embedding is a subclass)."""
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def _read_off(module: nn.Module, like: nn.Module) -> nn.Module:
    """A plain layer with the weights the (wrapped) module's forward computes; `like` is the layer it wraps."""
    if isinstance(like, nn.Embedding):
        return _read_off_embedding(module, like)
    assert isinstance(like, nn.Linear), f"only linear and embedding layers are read off, not {type(like)}"
    return _read_off_linear(module, like)


@torch.no_grad()
def _read_off_embedding(module: nn.Module, like: nn.Embedding) -> nn.Embedding:
    rows = module(torch.arange(like.num_embeddings))
    if type(like) is nn.Embedding:
        embedding: nn.Embedding = nn.Embedding.from_pretrained(rows, freeze=False, padding_idx=like.padding_idx)
        return embedding
    # Gemma's ScaledWordEmbedding returns weight[ids] * embed_scale: keep its class (the model's forward
    # relies on the scale), with the weight whose scaled rows are what the wrapped module returned.
    scale = getattr(like, "embed_scale", None)
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise VerifyError(f"cannot read off the embedding layer {type(like).__name__}: its forward is not "
                          "nn.Embedding's, and it has no scalar embed_scale")
    plain = copy.deepcopy(like)
    plain.weight = nn.Parameter(rows / scale.to(rows.dtype))
    return plain


@torch.no_grad()
def _read_off_linear(module: nn.Module, like: nn.Linear) -> nn.Linear:
    zero = module(torch.zeros(1, like.in_features))[0]
    weight = (module(torch.eye(like.in_features)) - zero).T
    has_bias = like.bias is not None or bool(zero.abs().max() > 0)
    plain = nn.Linear(like.in_features, weight.shape[0], bias=has_bias)
    plain.weight.copy_(weight)
    if has_bias:
        plain.bias.copy_(zero)
    return plain


def _transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model itself: `model`, or the base of a PeftModel (whose layers PEFT wrapped in place)."""
    import transformers

    if isinstance(model, transformers.PreTrainedModel):
        return model
    import peft  # only PEFT wraps the model in anything else

    assert isinstance(model, peft.PeftModel), f"unexpected reference model {type(model)}"
    base = model.get_base_model()
    assert isinstance(base, transformers.PreTrainedModel), f"unexpected PEFT base model {type(base)}"
    return base


def _materialize(wrapped: nn.Module, paths: dict[str, type[nn.Module]]) -> PreTrainedModel:
    """Replace every wrapped linear or embedding layer by a plain one with the weights it computes."""
    model = _transformers_model(wrapped)
    for path, kind in paths.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        module = getattr(parent, child)
        if type(module) is kind:
            continue
        like = next(m for m in module.modules() if type(m) is kind)  # the original layer inside the wrappers
        setattr(parent, child, _read_off(module, like))
    model.config.tie_word_embeddings = False  # the ends were read off separately; never re-tie them
    return model


def _attach_reference(model: PreTrainedModel, adapter: Adapter, layout: ModelLayout, scales: Scales) -> nn.Module:
    """`model` running `adapter` on top: `model` itself, wrapped in place, or a PeftModel around it."""
    if isinstance(adapter, So8tAdapter):
        _attach_so8t(model, adapter, layout, scales)
        return model
    if _peft_can_attach(model, adapter):
        return _attach_peft(model, adapter)
    _attach_lora_hooks(model, adapter, layout)
    return model


def build_reference(model: PreTrainedModel, adapters: Sequence[Adapter], layout: ModelLayout,
                    scales: Scales) -> nn.Module:
    """Base model in, adapter model (in manifest order, nothing folded) out."""
    paths = _linear_and_embedding_paths(model)
    for position, adapter in enumerate(adapters):
        adapted = _attach_reference(model, adapter, layout, scales)
        if position == len(adapters) - 1:
            return adapted
        model = _materialize(adapted, paths)
    return model
