"""Pure planning: what a manifest asks to be built, computed without touching anything."""

from __future__ import annotations

from dataclasses import dataclass

from .manifest import Manifest, Scales


@dataclass(frozen=True)
class QuantArtifact:
    tag: str
    quant: str
    gguf: str  # path relative to the variant's build directory


@dataclass(frozen=True)
class VariantPlan:
    variant: str
    scales: Scales
    baked_dir: str
    convert_type: str
    convert_gguf: str
    quants: tuple[QuantArtifact, ...]


def convert_outtype(ladder: list[str]) -> str:
    """The float type to convert to once, from which every quant level is made.

    f16 unless the ladder itself needs more: f32 when it asks for f32, or for both f16 and
    bf16 (neither can be made losslessly from the other); bf16 when it asks for bf16.
    """
    if "f32" in ladder or {"f16", "bf16"} <= set(ladder):
        return "f32"
    return "bf16" if "bf16" in ladder else "f16"


def plan_builds(manifest: Manifest) -> list[VariantPlan]:
    outtype = convert_outtype(manifest.quantize)
    plans = []
    for variant, scales in manifest.bake.variants.items():
        quants = tuple(
            QuantArtifact(tag=manifest.tag(variant, q), quant=q, gguf=f"{variant}/{manifest.name}-{q}.gguf")
            for q in manifest.quantize
        )
        plans.append(
            VariantPlan(
                variant=variant,
                scales=scales,
                baked_dir=f"{variant}/baked",
                convert_type=outtype,
                convert_gguf=f"{variant}/{manifest.name}-{outtype}.gguf",
                quants=quants,
            )
        )
    return plans
