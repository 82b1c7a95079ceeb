"""PEFT's adapter_config.json as a typed, frozen model, and PEFT's per-module rank and alpha lookup.

PEFT writes every field of its LoraConfig, most of them irrelevant to the merged weights
(dropout, training-time initialisers, task type, ...). Those are accepted. The fields that
switch on math we cannot fold into a plain checkpoint are refused by name, and so is any
key this module does not know that carries a value: a newer PEFT feature is off by default,
so a non-empty unknown key means an adapter whose math we have not checked.
"""

from __future__ import annotations

import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import AdapterError
from ..jsonfile import read_json_object
from ..validation import first_error

CONFIG_FILE = "adapter_config.json"

# Features whose merged form is not a plain checkpoint, or that we do not fold: refused when set.
UNSUPPORTED = {
    "alora_invocation_tokens": "activated LoRA only acts after its invocation tokens, which no merged weight can do",
    "layer_replication": "it shares one set of base weights between several layers, which a plain checkpoint "
                         "cannot express",
    "trainable_token_indices": "trainable tokens are not folded",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not folded",
    "use_qalora": "QA-LoRA (use_qalora) is not folded",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not folded",
    "arrow_config": "Arrow routing depends on the input, which no merged weight can do",
    "megatron_config": "Megatron-parallel layers are not folded",
    "velora_config": "VeLoRA (velora_config) is not folded",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not folded",
    "kasa_config": "KaSA (kasa_config) is not folded",
}
# Initialisers that change the base weights themselves: the adapter only works on that changed base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# PEFT keys that never change the merged weights (training-time options, bookkeeping).
HARMLESS = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
    "ensure_weight_tying", "modules_to_tie", "target_modules_to_tie", "megatron_core", "qalora_group_size",
}


class PeftLoraConfig(BaseModel):
    """The fields of a PEFT LoRA adapter_config.json that decide the merged weights."""

    model_config = ConfigDict(frozen=True, extra="allow")

    peft_type: Literal["LORA"] = Field(description="Only LoRA adapters are folded.")
    r: int = Field(description="Default rank of every LoRA pair.")
    lora_alpha: float = Field(description="Default alpha; scaling is alpha / r (alpha / sqrt(r) with rsLoRA).")
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA: rows renormalised to a magnitude.")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="Per-module ranks (regex or suffix).")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Per-module alphas.")
    modules_to_save: list[str] | None = Field(default=None, description="Modules saved whole.")
    lora_bias: bool = Field(default=False, description="lora_B carries a bias, added to the module's bias.")
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which base biases were trained.")
    base_model_name_or_path: str | None = None

    @field_validator("r", mode="before")
    @classmethod
    def _strict_int(cls, value: Any) -> Any:
        if type(value) is not int or value <= 0:
            raise ValueError(f"must be a positive integer, got {value!r}")
        return value

    @field_validator("lora_alpha", mode="before")
    @classmethod
    def _finite_number(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be a number, got {value!r}")
        return value

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _compiled_keys(cls, value: Any) -> Any:
        for key in value or {}:
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"key {key!r} is not a valid regular expression ({e})") from None
        return value or {}

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, value: dict[str, int]) -> dict[str, int]:
        for key, rank in value.items():
            if rank <= 0:
                raise ValueError(f"{key!r}: rank must be positive, got {rank}")
        return value

    def rank_of(self, module: str) -> int:
        return self.rank_pattern[key] if (key := pattern_key(self.rank_pattern, module)) else self.r

    def alpha_of(self, module: str) -> float:
        return self.alpha_pattern[key] if (key := pattern_key(self.alpha_pattern, module)) else self.lora_alpha

    def scaling_of(self, module: str) -> float:
        rank, alpha = self.rank_of(module), self.alpha_of(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @cached_property
    def features(self) -> tuple[str, ...]:
        """The PEFT features this adapter uses, for provenance and messages."""
        flags = {"dora": self.use_dora, "rslora": self.use_rslora, "rank_pattern": bool(self.rank_pattern),
                 "alpha_pattern": bool(self.alpha_pattern), "modules_to_save": bool(self.modules_to_save),
                 "lora_bias": self.lora_bias, f"bias_{self.bias}": self.bias != "none"}
        return tuple(name for name, on in flags.items() if on)


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first pattern that names `module` the way PEFT matches it: the whole name or a dotted suffix, as a regex."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _refuse_unsupported(raw: dict[str, Any], where: Path) -> None:
    for key, why in UNSUPPORTED.items():
        if raw.get(key):
            raise AdapterError(f"{where}: {key}: not supported: {why}")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(
            f"{where}: init_lora_weights: {init!r} changes the base weights, so the adapter only fits that changed "
            "base; save it with save_pretrained(path_initial_model_for_weight_conversion=...) to get a plain LoRA"
        )
    known = HARMLESS | set(PeftLoraConfig.model_fields) | set(UNSUPPORTED)
    for key, value in raw.items():
        if key not in known and value not in (None, False, 0, "", [], {}):
            raise AdapterError(f"{where}: {key}: unknown PEFT option with a value ({value!r}); not folded")


def read_peft_config(path: Path) -> PeftLoraConfig:
    where = path / CONFIG_FILE
    raw = read_json_object(where, AdapterError, f"missing (is {path} a PEFT LoRA adapter?)")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type: only LORA is supported, got {raw.get('peft_type')!r}")
    _refuse_unsupported(raw, where)
    try:
        return PeftLoraConfig.model_validate(raw)
    except ValidationError as e:
        raise AdapterError(f"{where}: {first_error(e)}") from None
