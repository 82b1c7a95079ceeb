"""`verify`: prove a bake exact by comparing logits with the unmerged adapter model.

The reference never folds anything (reference.py): SO8T maps act on activations through
wrappers, and a PEFT LoRA runs through PEFT's own forward when peft is installed. It shares
only the spec's site table and the map constructors with the bake, so a wrong fold, a wrong
row split or a wrong adapter order shows up as a logit difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..manifest.schema import Scales
from .adapters import AdapterSpecs, load_adapters
from .layout import layout_from_config
from .model_dir import open_model_dir
from .reference import attach_adapters, build_reference

if TYPE_CHECKING:  # transformers is imported where it is used: the control plane runs without it
    from transformers import PreTrainedModel

__all__ = ["VerifyReport", "attach_adapters", "load_adapters", "probe_tokens", "verify_bake"]

# Max |Δlogit| allowed, by the baked model's weight dtype, as (absolute, relative to the largest
# reference logit). float32 must meet the spec's 1e-4 outright. A half-precision bake rounds each
# folded weight once more than the base did; about five ulps of the logit scale covers that
# (measured on tiny random models: bf16 ~0.6 %, fp16 ~0.07 % of the largest logit).
TOLERANCES = {"F32": (1e-4, 0.0), "BF16": (0.0, 2e-2), "F16": (0.0, 2.5e-3)}


def probe_tokens(vocab_size: int, sequences: int = 2, length: int = 24) -> torch.Tensor:
    """Fixed token ids, the same on every run and machine."""
    generator = torch.Generator().manual_seed(8)
    return torch.randint(0, vocab_size, (sequences, length), generator=generator)


def _load(path: Path) -> PreTrainedModel:
    import transformers

    # Our output is one result line; transformers' loading bars and notices would bury it.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model: PreTrainedModel = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                               attn_implementation="eager").eval()
    return model


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits: torch.Tensor = model(tokens).logits.to(torch.float64)
    return logits


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


def verify_bake(model_dir: Path, adapter_dirs: AdapterSpecs, baked_dir: Path,
                scales: Scales, tolerance: float | None = None) -> VerifyReport:
    """Compare the unmerged adapter model with the baked model on fixed tokens.

    With a resized vocabulary the tokens include new ids; the adapter's effect is then
    measured on the logits of the ids the base model has.
    """
    model = open_model_dir(model_dir)
    layout = layout_from_config(model.config, str(model_dir / "config.json"))
    adapters = load_adapters(adapter_dirs, model)
    baked_dtype = _weight_dtype(baked_dir)
    base_vocab = int(model.config["vocab_size"])
    tokens = probe_tokens(int(open_model_dir(baked_dir).config.get("vocab_size", base_vocab)))

    reference_model = _load(model_dir)
    base = _logits(reference_model, tokens.clamp(max=base_vocab - 1))
    reference = _logits(build_reference(reference_model, adapters, layout, scales), tokens)
    del reference_model  # keep at most one model in memory
    baked = _logits(_load(baked_dir), tokens)

    if tolerance is None:
        absolute, relative = TOLERANCES[baked_dtype]
        tolerance = absolute + relative * max(1.0, float(reference.abs().max()))
    return VerifyReport(
        max_abs_diff=float((reference - baked).abs().max()),
        adapter_effect=float((reference[..., :base_vocab] - base[..., :base_vocab]).abs().max()),
        tolerance=tolerance,
        baked_dtype=baked_dtype,
    )
