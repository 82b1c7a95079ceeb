"""Where each projection of a decoder layer lives in a Hugging Face checkpoint.

Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; Llama, Mistral and Qwen2
keep them separate. A `Slot` names the weight tensor and, for a fused one, the rows that
belong to one projection, so every fold can be written once for all architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError

SUPPORTED_MODEL_TYPES = ("phi3", "llama", "mistral", "qwen2")
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Slot:
    weight: str  # tensor name, e.g. "model.layers.3.self_attn.qkv_proj.weight"
    rows: tuple[int, int] | None = None  # [start, stop) inside a fused weight; None = all rows

    @property
    def bias(self) -> str:
        return self.weight.removesuffix(".weight") + ".bias"


@dataclass(frozen=True)
class ModelLayout:
    model_type: str
    hidden_size: int
    num_layers: int
    q_rows: int
    kv_rows: int
    intermediate_size: int
    tie_word_embeddings: bool

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


def _whole_tensors(slots) -> list[Slot]:
    names: list[str] = []
    for slot in slots:
        if slot.weight not in names:
            names.append(slot.weight)
    return [Slot(name) for name in names]


def layout_from_config(config: dict, where: str) -> ModelLayout:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{where}: unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        return ModelLayout(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            q_rows=heads * head_dim,
            kv_rows=kv_heads * head_dim,
            intermediate_size=int(config["intermediate_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{where}: config.json lacks a valid {e}") from e
