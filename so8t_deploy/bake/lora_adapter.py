"""Load and validate a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

Only what can be merged exactly as W <- W + scaling * B A is accepted. Every PEFT feature
that changes that math (DoRA, saved modules, per-module ranks, LoRA biases, ...) is
rejected by name rather than silently ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterError
from ..jsonfile import read_json_object
from .safetensors_io import FLOAT_DTYPES, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>[\w.]+)\.lora_(?P<part>[AB])\.weight$")

# Config keys whose non-empty / non-default value means math we do not fold.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "lora_bias": "LoRA biases (lora_bias)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "megatron_config": "Megatron layers (megatron_config)",
}


@dataclass(frozen=True)
class LoraModule:
    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    modules: tuple[LoraModule, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def files(self) -> list[Path]:
        return [self.path / CONFIG_FILE, self.path / WEIGHTS_FILE]


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    config = read_json_object(config_path, AdapterError, f"missing (is {path} a PEFT LoRA adapter?)")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_path}: peft_type: only LORA is supported, got {config.get('peft_type')!r}")
    for key, feature in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{config_path}: {key}: {feature} is not supported; merge it with PEFT first")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{config_path}: bias: trained biases ({config['bias']!r}) are not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if type(rank) is not int or rank <= 0:
        raise AdapterError(f"{config_path}: r: must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{config_path}: lora_alpha: must be a number, got {alpha!r}")
    return config


def load_lora_adapter(path: Path) -> LoraAdapter:
    config = _read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{weights}: missing (only safetensors adapters are supported)")
    header = read_header(weights, AdapterError)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        for name, entry in header.tensors.items():
            match = _KEY_RE.match(name)
            if not match:
                raise AdapterError(f"{weights}: unsupported tensor {name!r} (expected {PEFT_PREFIX}...lora_A/B.weight)")
            if entry.dtype not in FLOAT_DTYPES or len(entry.shape) != 2:
                raise AdapterError(f"{weights}: tensor {name!r} must be a 2-D float matrix")
            tensor = f.get_tensor(name)
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{weights}: tensor {name!r} contains NaN or infinity")
            parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise AdapterError(f"{weights}: no LoRA tensors")
    modules = []
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"{weights}: module {module!r} has no {missing} (partial pair)")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != config["r"] or b.shape[1] != config["r"]:
            raise AdapterError(
                f"{weights}: module {module!r} has rank {a.shape[0]}x{b.shape[1]}, config r is {config['r']}"
            )
        modules.append(LoraModule(module, a, b))
    return LoraAdapter(
        path=path,
        rank=config["r"],
        alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        modules=tuple(modules),
    )
