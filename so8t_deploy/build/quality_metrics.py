"""The numbers behind the quality gate, in numpy: run in the worker, where llama.cpp is.

For one variant, the reference next-token distributions come from its float GGUF; each quant
level runs on the same token windows of the eval text, and is compared position by position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ManifestError
from .steps import EvalResult, EvalStep, QuantMetrics


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per position, in nats."""
    log_p, log_q = log_softmax(reference_logits), log_softmax(logits)
    kl: np.ndarray = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return kl


def next_token_nll(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """-log P(token[i+1] | tokens[:i+1]) for every position that has a next token."""
    log_q = log_softmax(logits[:-1])
    return -log_q[np.arange(len(tokens) - 1), tokens[1:]]


def token_windows(tokens: list[int], windows: int, context: int) -> list[list[int]]:
    """Up to `windows` consecutive windows of `context` tokens (the text is repeated if short)."""
    if not tokens:
        raise ManifestError("quality.eval_text: the text has no tokens")
    needed = windows * context
    stream = (tokens * (needed // len(tokens) + 1))[:needed]
    return [stream[i * context:(i + 1) * context] for i in range(windows)]


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], windows: list[list[int]]) -> dict[str, float]:
    kl = np.concatenate([kl_divergence(r, c) for r, c in zip(reference, candidate, strict=True)])
    top1 = np.concatenate([r.argmax(-1) == c.argmax(-1) for r, c in zip(reference, candidate, strict=True)])
    nll = np.concatenate([next_token_nll(c, w) for c, w in zip(candidate, windows, strict=True)])
    return {"mean_kl": float(kl.mean()), "p99_kl": float(np.percentile(kl, 99)), "top1": float(top1.mean()),
            "perplexity": float(np.exp(nll.mean()))}


def evaluate_step(step: EvalStep) -> EvalResult:
    """Every candidate against the reference on the same windows (the reference logits computed once)."""
    from ..external.llamacpp import gguf_generation_speed, gguf_tokenize, gguf_window_logits

    windows = token_windows(gguf_tokenize(step.reference, step.text), step.windows, step.context)
    reference_logits = gguf_window_logits(step.reference, windows)
    metrics = []
    for candidate in step.candidates:
        logits = reference_logits if candidate == step.reference else gguf_window_logits(candidate, windows)
        numbers = compare(reference_logits, logits, windows)
        metrics.append(QuantMetrics(candidate=Path(candidate), **numbers,
                                    tokens_per_second=gguf_generation_speed(candidate, windows[0][:16])))
    return EvalResult(metrics=metrics)
