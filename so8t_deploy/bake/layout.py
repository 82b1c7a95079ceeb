"""Where each projection of a decoder layer lives in a Hugging Face checkpoint.

Phi-3 (and Phi-4, the same model_type) fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`;
Llama, Mistral, Qwen2, Qwen3 and Gemma 2/3 keep them separate. A `Slot` names the weight tensor and,
for a fused one, the rows that belong to one projection, so every fold can be written once for all
architectures. Qwen3 and Gemma 3 add per-head `q_norm`/`k_norm` after q/k; Gemma 2 and 3 add sandwich
norms around attention and MLP (docs/so8t-adapter-v1.1.md says where each SO8T site acts on them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError

# model_type -> the family's name, as `validate` reports it.
FAMILIES = {"phi3": "Phi-3 / Phi-4", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
            "gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# Per-head RMS norms on q and k (applied after the projection, so input-side folds stay exact).
QK_NORM_TYPES = ("qwen3", "gemma3_text")
# Sandwich norms: post_attention_layernorm after o_proj, pre/post_feedforward_layernorm around the MLP.
SANDWICH_NORM_TYPES = ("gemma2", "gemma3_text")
# Families whose llama.cpp graph has no output matrix of its own: gemma2's converter drops lm_head.weight
# (conversion/gemma.py Gemma2Model.filter_tensors) and src/models/gemma2.cpp multiplies by token_embd.
HEAD_IS_EMBEDDING_TYPES = ("gemma2",)
_REFUSED_MODEL_TYPES = {
    "gemma3": "Gemma 3's multimodal checkpoint (Gemma3ForConditionalGeneration, tensors under language_model.*) "
              "is not supported; bake a text-only Gemma 3 (Gemma3ForCausalLM, model_type gemma3_text)",
}
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Slot:
    weight: str  # tensor name, e.g. "model.layers.3.self_attn.qkv_proj.weight"
    rows: tuple[int, int] | None = None  # [start, stop) inside a fused weight; None = all rows

    @property
    def bias(self) -> str:
        return self.weight.removesuffix(".weight") + ".bias"


# A size in a tensor's shape, and the config.json fields it comes from (for messages).
Dim = tuple[int, str]


@dataclass(frozen=True)
class ModelLayout:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    q_rows: int
    kv_rows: int
    intermediate_size: int
    tie_word_embeddings: bool
    head_dim: int = 0  # the q_norm/k_norm size where the family has them

    @property
    def family(self) -> str:
        """The family's name, e.g. "Gemma 2 (gemma2)"."""
        return f"{FAMILIES[self.model_type]} ({self.model_type})"

    @property
    def fused(self) -> bool:
        return self.model_type == "phi3"

    def _prefix(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def projection(self, layer: int, role: str) -> Slot:
        """Slot of one projection: role is q, k, v, o, gate, up or down."""
        p = self._prefix(layer)
        if role == "o":
            return Slot(f"{p}.self_attn.o_proj.weight")
        if role == "down":
            return Slot(f"{p}.mlp.down_proj.weight")
        if not self.fused:
            module = "self_attn" if role in ("q", "k", "v") else "mlp"
            return Slot(f"{p}.{module}.{role}_proj.weight")
        q, kv, inter = self.q_rows, self.kv_rows, self.intermediate_size
        rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, inter), "up": (inter, 2 * inter)}
        fused = "self_attn.qkv_proj" if role in ("q", "k", "v") else "mlp.gate_up_proj"
        return Slot(f"{p}.{fused}.weight", rows[role])

    def expected_shapes(self) -> dict[str, tuple[Dim, ...]]:
        """Every tensor config.json implies, with the fields behind each size (lm_head: unless tied away)."""
        v, h = (self.vocab_size, "vocab_size"), (self.hidden_size, "hidden_size")
        i = (self.intermediate_size, "intermediate_size")
        q, kv = (self.q_rows, "num_attention_heads*head_dim"), (self.kv_rows, "num_key_value_heads*head_dim")
        shapes: dict[str, tuple[Dim, ...]] = {EMBED: (v, h), LM_HEAD: (v, h), "model.norm.weight": (h,)}
        for layer in range(self.num_layers):
            p = self._prefix(layer)
            shapes |= {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                       f"{p}.self_attn.o_proj.weight": (h, q), f"{p}.mlp.down_proj.weight": (h, i)}
            if self.model_type in SANDWICH_NORM_TYPES:
                shapes |= {f"{p}.pre_feedforward_layernorm.weight": (h,),
                           f"{p}.post_feedforward_layernorm.weight": (h,)}
            if self.model_type in QK_NORM_TYPES:
                hd = (self.head_dim, "head_dim")
                shapes |= {f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,)}
            if self.fused:
                qkv = (q[0] + 2 * kv[0], "(num_attention_heads+2*num_key_value_heads)*head_dim")
                shapes[f"{p}.self_attn.qkv_proj.weight"] = (qkv, h)
                shapes[f"{p}.mlp.gate_up_proj.weight"] = ((2 * i[0], "2*intermediate_size"), h)
            else:
                for role, rows in (("q", q), ("k", kv), ("v", kv), ("gate", i), ("up", i)):
                    shapes[self.projection(layer, role).weight] = (rows, h)
        return shapes

    def attention_inputs(self, layer: int) -> list[Slot]:
        """The weights that read the attention input (whole tensors; a fused one once)."""
        return _whole_tensors(self.projection(layer, r) for r in ("q", "k", "v"))

    def mlp_inputs(self, layer: int) -> list[Slot]:
        return _whole_tensors(self.projection(layer, r) for r in ("gate", "up"))

    def slot_for_module(self, module: str) -> Slot | None:
        """Map a module path such as `model.layers.0.self_attn.q_proj` to its slot.

        Separate names also resolve on a fused model (a LoRA trained on a Llama-style
        Phi-3 puts q_proj's update into the q rows of qkv_proj).
        """
        parts = module.split(".")
        if module == "lm_head":
            return Slot(LM_HEAD)
        if len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        layer, name = int(parts[2]), parts[4]
        if layer >= self.num_layers:
            return None
        roles = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                 "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
        if name in roles:
            return self.projection(layer, roles[name])
        if self.fused and name in ("qkv_proj", "gate_up_proj"):
            return Slot(f"{'.'.join(parts)}.weight")
        return None


def _whole_tensors(slots: Iterable[Slot]) -> list[Slot]:
    names: list[str] = []
    for slot in slots:
        if slot.weight not in names:
            names.append(slot.weight)
    return [Slot(name) for name in names]


_REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_DERIVED_SIZES = ("num_key_value_heads", "head_dim")  # absent or null: taken from the others


def _sizes(config: dict[str, Any], where: str) -> dict[str, int]:
    """config.json's sizes, each a positive integer (true, 2.0 and "2" are not sizes)."""
    sizes = {}
    for key in (*_REQUIRED_SIZES, *_DERIVED_SIZES):
        value = config.get(key)
        if value is None and key in _DERIVED_SIZES:
            continue
        if type(value) is not int or value < 1:
            raise ModelError(f"{where}: {key}: must be a positive integer, got {value!r}")
        sizes[key] = value
    return sizes


def layout_from_config(config: dict[str, Any], where: str) -> ModelLayout:
    """The layout config.json describes; sizes that cannot make a model (0 heads, 5 heads in 64) are refused."""
    model_type = config.get("model_type")
    if model_type in _REFUSED_MODEL_TYPES:
        raise ModelError(f"{where}: model_type {model_type!r}: {_REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{where}: unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    sizes = _sizes(config, where)
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    kv_heads = sizes.get("num_key_value_heads", heads)
    if hidden % heads:
        raise ModelError(f"{where}: num_attention_heads: {heads} does not divide hidden_size {hidden}")
    if heads % kv_heads:
        raise ModelError(f"{where}: num_key_value_heads: {kv_heads} does not divide num_attention_heads {heads}")
    head_dim = sizes.get("head_dim", hidden // heads)
    return ModelLayout(
        model_type=model_type,
        vocab_size=sizes["vocab_size"],
        hidden_size=hidden,
        num_layers=sizes["num_hidden_layers"],
        q_rows=heads * head_dim,
        kv_rows=kv_heads * head_dim,
        intermediate_size=sizes["intermediate_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type in SANDWICH_NORM_TYPES)),
        head_dim=head_dim,
    )
