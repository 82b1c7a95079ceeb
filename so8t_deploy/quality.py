"""How much each quant level loses: KL divergence and top-1 agreement against the variant's float GGUF.

For every variant, the reference next-token distributions come from its converted GGUF (f16,
bf16 or f32); every quant level runs on the same token windows of an eval text, in llama.cpp.
Results are cached by the content of everything they depend on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .build import BuildReport, BuiltArtifact
from .cache import ArtifactCache, cache_key
from .errors import ManifestError
from .manifest import Manifest


@dataclass(frozen=True)
class QuantQuality:
    variant: str
    tag: str
    quant: str
    reference: str  # the quant level used as reference (f16, bf16 or f32)
    mean_kl: float
    p99_kl: float
    top1: float
    perplexity: float
    size: int
    bits_per_weight: float
    tokens_per_second: float

    def gate_failures(self, manifest: Manifest) -> list[str]:
        q = manifest.quality
        failures = []
        if q.max_mean_kl is not None and self.mean_kl > q.max_mean_kl:
            failures.append(f"mean KL {self.mean_kl:.4f} > {q.max_mean_kl:g}")
        if q.min_top1 is not None and self.top1 < q.min_top1:
            failures.append(f"top-1 agreement {self.top1:.3f} < {q.min_top1:g}")
        return failures


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per position, in nats."""
    log_p, log_q = log_softmax(reference_logits), log_softmax(logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def next_token_nll(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """-log P(token[i+1] | tokens[:i+1]) for every position that has a next token."""
    log_q = log_softmax(logits[:-1])
    return -log_q[np.arange(len(tokens) - 1), tokens[1:]]


def eval_text(manifest: Manifest) -> str:
    path = manifest.quality.eval_text
    if path is None:
        return resources.files("so8t_deploy").joinpath("data/eval.txt").read_text(encoding="utf-8")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"quality.eval_text: cannot read {path}: {e.strerror}") from e


def token_windows(tokens: list[int], windows: int, context: int) -> list[list[int]]:
    """Up to `windows` consecutive windows of `context` tokens (the text is repeated if short)."""
    if not tokens:
        raise ManifestError("quality.eval_text: the text has no tokens")
    needed = windows * context
    stream = (tokens * (needed // len(tokens) + 1))[:needed]
    return [stream[i * context:(i + 1) * context] for i in range(windows)]


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], windows: list[list[int]]) -> dict:
    kl = np.concatenate([kl_divergence(r, c) for r, c in zip(reference, candidate, strict=True)])
    top1 = np.concatenate([r.argmax(-1) == c.argmax(-1) for r, c in zip(reference, candidate, strict=True)])
    nll = np.concatenate([next_token_nll(c, w) for c, w in zip(candidate, windows, strict=True)])
    return {"mean_kl": float(kl.mean()), "p99_kl": float(np.percentile(kl, 99)), "top1": float(top1.mean()),
            "perplexity": float(np.exp(nll.mean()))}


def evaluate(manifest: Manifest, build: BuildReport, cache_dir: Path) -> list[QuantQuality]:
    from .external.llamacpp import gguf_generation_speed, gguf_tokenize, gguf_window_logits, library_version

    cache = ArtifactCache(cache_dir / "objects")
    text, q = eval_text(manifest), manifest.quality
    llama = library_version()
    results = []
    for variant in manifest.bake.variants:
        artifacts = [a for a in build.artifacts if a.variant == variant]
        reference = _reference_artifact(artifacts, build, variant)
        windows = token_windows(gguf_tokenize(reference.path, text), q.windows, q.context)
        reference_logits = None
        for artifact in artifacts:
            key = cache_key(stage="eval", reference=reference.sha256, candidate=artifact.sha256, text=text,
                            windows=q.windows, context=q.context, llama=llama)
            record = cache.lookup("eval", key)
            if record is None:
                if reference_logits is None:
                    reference_logits = gguf_window_logits(reference.path, windows)
                logits = reference_logits if artifact is reference else gguf_window_logits(artifact.path, windows)
                with cache.produce("eval", key) as (_, record):
                    record.update(compare(reference_logits, logits, windows))
                    record["tokens_per_second"] = gguf_generation_speed(artifact.path, windows[0][:16])
            results.append(QuantQuality(variant, artifact.tag, artifact.quant, reference.quant, record["mean_kl"],
                                        record["p99_kl"], record["top1"], record["perplexity"], artifact.size,
                                        artifact.bits_per_weight, record["tokens_per_second"]))
    return results


def _reference_artifact(artifacts: list[BuiltArtifact], build: BuildReport, variant: str) -> BuiltArtifact:
    for quant in ("f32", "bf16", "f16"):
        match = [a for a in artifacts if a.quant == quant]
        if match:
            return match[0]
    converted = [a for a in build.references if a.variant == variant]
    return converted[0]


def as_json(results: list[QuantQuality]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
