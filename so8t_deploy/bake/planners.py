"""Turn each adapter into tensor edits, in manifest order: SO8T maps and every PEFT LoRA variant we fold."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import AdapterError
from ..manifest.schema import Scales
from .adapters import Adapter
from .edits import AddLowRank, AddVector, DoraLowRank, LeftMultiply, RightMultiply, ScaleColumnsToNorm
from .layout import EMBED, FAMILIES, HEAD_IS_EMBEDDING_TYPES, LM_HEAD, ModelLayout, Slot
from .lora_adapter import LoraAdapter, LoraModule
from .maps import BlockDiagonalMap, LinearMap, ProjectedMap, gate_strength
from .plan import BakePlan, check_shape, ensure_bias
from .so8t_adapter import WEIGHTS_FILE as SO8T_WEIGHTS_FILE
from .so8t_adapter import BlockGroup, So8tAdapter

_TRIALITY_ROLE = {"vector": "q", "spinor_plus": "k", "spinor_minus": "v"}
EMBED_MODULE = EMBED.removesuffix(".weight")


def _block_map(group: BlockGroup | None, scale: float) -> BlockDiagonalMap | None:
    if group is None or scale == 0:
        return None  # s = 0 means M = I: skipped, so the tensor stays byte-identical
    return BlockDiagonalMap.from_generators(group.generators, gate_strength(scale, group.gate))


def _plan_triality(plan: BakePlan, adapter: So8tAdapter, layout: ModelLayout, scales: Scales, layer: int) -> None:
    """One layer's triality maps: each representation's map acts on the input of its projection's rows."""
    for rep, role in _TRIALITY_ROLE.items():
        group = adapter.triality.get((layer, rep))
        if group is not None and scales.triality != 0:
            m = ProjectedMap.from_generator(
                group.projector, group.generator, gate_strength(scales.triality, group.gate)
            )
            slot = layout.projection(layer, role)
            plan.add(slot.weight, RightMultiply(m, slot.rows))


def _plan_so8t(plan: BakePlan, adapter: So8tAdapter, layout: ModelLayout, scales: Scales) -> None:
    def left(slot: Slot, m: LinearMap) -> None:
        plan.add(slot.weight, LeftMultiply(m))
        if plan.has(slot.bias):  # an output-side map moves the bias too; input-side maps leave it alone
            plan.add(slot.bias, LeftMultiply(m))

    for layer in range(layout.num_layers):
        _plan_triality(plan, adapter, layout, scales, layer)
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


def _plan_replacements(plan: BakePlan, adapter: LoraAdapter) -> None:
    """Saved whole tensors first: PEFT loads them into the base before its LoRA layers act on top."""
    saved_modules = adapter.config.modules_to_save or []
    for replacement in adapter.replacements:
        check_shape(plan, replacement.tensor, replacement.ref.shape, f"{adapter.weights_file}: {replacement.key}")
        module = replacement.tensor.rpartition(".")[0]
        # The embedding's own matrix (a targeted embedding's base_layer, or a resized one) is what a tied
        # lm_head shares; PEFT's modules_to_save (matched by name suffix, as PEFT does) are separate copies.
        shared = not any(module.endswith(name) for name in saved_modules)
        plan.replace(replacement.tensor, replacement.ref, shared)


def _plan_linear(plan: BakePlan, module: LoraModule, layout: ModelLayout, where: str) -> None:
    # PEFT applies fan_in_fan_out only to Conv1D layers (GPT-2 style [in, out] weights) and
    # resets it for nn.Linear; every architecture we bake uses nn.Linear, so B A is [out, in].
    slot = layout.slot_for_module(module.module)
    shape = plan.shape(slot.weight) if slot is not None else None
    if slot is None or shape is None:
        raise AdapterError(f"{where}: LoRA targets {module.module!r}, which the base model does not have")
    out_dim, in_dim = shape
    rows = slot.rows or (0, out_dim)
    expected = (rows[1] - rows[0], in_dim)
    got = (module.b.shape[0], module.a.shape[1])
    if got != expected:
        raise AdapterError(f"{where}: LoRA for {module.module!r} has shape {list(got)}, expected {list(expected)}")
    for name, vector in (("lora_magnitude_vector", module.magnitude), ("lora_B.bias", module.bias)):
        if vector is not None and tuple(vector.shape) != expected[:1]:
            raise AdapterError(f"{where}: {name} of {module.module!r} has shape {list(vector.shape)}, "
                               f"expected {list(expected[:1])}")
    if module.magnitude is not None:
        plan.add(slot.weight, DoraLowRank(module.a, module.b, module.scaling, slot.rows, magnitude=module.magnitude))
    else:
        plan.add(slot.weight, AddLowRank(module.a, module.b, module.scaling, slot.rows))
    if module.bias is not None:
        ensure_bias(plan, layout, slot, module.module, where)
        plan.add(slot.bias, AddVector(module.scaling * module.bias.float(), slot.rows))


def _plan_embedding(plan: BakePlan, module: LoraModule, where: str) -> None:
    """E <- E + s (B A)^T in PEFT's layout: lora_embedding_A is [r, vocab], lora_embedding_B is [hidden, r]."""
    if module.module != EMBED_MODULE:
        raise AdapterError(f"{where}: embedding LoRA on {module.module!r}; only {EMBED_MODULE!r} is folded")
    vocab, hidden = plan.require_shape(EMBED, where)
    got = (module.a.shape[1], module.b.shape[0])
    if got != (vocab, hidden):
        raise AdapterError(f"{where}: embedding LoRA for {module.module!r} has shape {list(got)}, "
                           f"expected {[vocab, hidden]}")
    # Row v of (B A)^T is A[:, v]^T B^T: an AddLowRank whose "B" is A^T and whose "A" is B^T.
    plan.add(EMBED, AddLowRank(module.b.T, module.a.T, module.scaling))
    if module.magnitude is not None:
        if tuple(module.magnitude.shape) != (hidden,):
            raise AdapterError(f"{where}: lora_magnitude_vector of {module.module!r} has shape "
                               f"{list(module.magnitude.shape)}, expected {[hidden]}")
        # PEFT's embedding DoRA normalises each hidden column over the whole vocabulary.
        plan.add(EMBED, ScaleColumnsToNorm(module.magnitude))


def _plan_lora(plan: BakePlan, adapter: LoraAdapter, layout: ModelLayout) -> None:
    where = str(adapter.weights_file)
    _plan_replacements(plan, adapter)
    for module in adapter.modules:
        if module.embedding:
            _plan_embedding(plan, module, where)
        else:
            _plan_linear(plan, module, layout, where)


def _vocabulary_rows(plan: BakePlan) -> int | None:
    """Rows of the embedding matrix as planned so far (None: the model has none)."""
    shape = plan.shape(EMBED)
    return shape[0] if shape is not None else None


def _check_vocabulary(plan: BakePlan, rows: int, changed_by: LoraAdapter | None) -> None:
    """`rows`: the embeddings' rows after every adapter."""
    lm_head = plan.shape(LM_HEAD)
    if not plan.tied and lm_head is not None and lm_head[0] != rows:
        where = changed_by.weights_file if changed_by else "the adapters"
        raise AdapterError(f"{where}: the embeddings end with {rows} rows but lm_head with "
                           f"{lm_head[0]}; a resized vocabulary needs lm_head saved with the adapter "
                           "(modules_to_save)")
    if rows != plan.base_shapes[EMBED][0]:
        plan.config_updates["vocab_size"] = rows
        plan.vocabulary_from = changed_by


def _head_differs(plan: BakePlan) -> bool:
    """Whether lm_head no longer is the embedding matrix (or, stored apart in the base, either end changed)."""
    if LM_HEAD not in plan.base_shapes:
        return not plan.tied
    return LM_HEAD in plan.tensors or EMBED in plan.tensors


def _refuse_split_head(layout: ModelLayout, adapter: Adapter) -> None:
    """On a family whose llama.cpp output is the embedding matrix, a separate head would be dropped silently."""
    family = FAMILIES[layout.model_type]
    why = (f"which {family} cannot have: llama.cpp's {layout.model_type} always uses the token embeddings as its "
           "output matrix (its converter drops lm_head.weight), so the GGUF would lose it")
    if isinstance(adapter, So8tAdapter):
        raise AdapterError(f"{adapter.path / SO8T_WEIGHTS_FILE}: final: the final map makes lm_head = E·M differ "
                           f"from the token embeddings E, {why}; remove final.* from the adapter")
    causes = [f"{'embedding ' if m.embedding else ''}LoRA on {m.module!r}" for m in adapter.modules
              if m.module in ("lm_head", EMBED_MODULE)]
    causes += [f"saved tensor {r.key!r}" for r in adapter.replacements if r.tensor in (LM_HEAD, EMBED)]
    raise AdapterError(f"{adapter.weights_file}: {', '.join(causes) or 'the adapter'} makes lm_head differ from "
                       f"the token embeddings, {why}")


def plan_bake(layout: ModelLayout, shapes: dict[str, tuple[int, ...]], adapters: Sequence[Adapter],
              scales: Scales) -> BakePlan:
    """Edits for every tensor the adapters touch; `shapes` are the base checkpoint's tensors."""
    plan = BakePlan.for_base(shapes)
    changed_by = None
    for adapter in adapters:
        split_before = _head_differs(plan)
        if isinstance(adapter, So8tAdapter):
            _plan_so8t(plan, adapter, layout, scales)
        else:
            rows = _vocabulary_rows(plan)
            _plan_lora(plan, adapter, layout)
            rows_after = _vocabulary_rows(plan)
            if rows_after is not None and rows_after != rows:
                changed_by = adapter
        if layout.model_type in HEAD_IS_EMBEDDING_TYPES and not split_before and _head_differs(plan):
            _refuse_split_head(layout, adapter)
    final_rows = _vocabulary_rows(plan)
    if final_rows is not None:
        _check_vocabulary(plan, final_rows, changed_by)
    return plan
