"""Smoke tests: every deployed tag must answer each prompt, in time, fast enough, matching `expect`.

A smoke test must mean the same on every host, so it fixes what Ollama would otherwise draw or
take from the model: the seed (Ollama's default is random), the temperature (0 unless the entry
says otherwise), the shipped num_ctx (Phi-3.5's longrope depends on it) and keep_alive (0 by
default, so testing new tags never evicts the models serving production).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from ..cancel import CancelToken
from ..external.ollama_host import GenerateFailed, GenerateTimedOut, OllamaHost
from ..manifest.schema import SmokeTest

# Bounds the reply (a smoke prompt needs a few words); the manifest's own num_predict wins.
DEFAULT_NUM_PREDICT = 64
# With no smoke tests declared, a candidate must still load and generate before it goes live; what it says
# is not judged (any reply, an empty one included, passes).
LOAD_CHECK = SmokeTest(prompt="Hello.", expect="", timeout_s=300)
LOAD_CHECK_NUM_PREDICT = 1


@dataclass(frozen=True)
class SmokeResult:
    host: str
    tag: str
    prompt: str
    passed: bool
    reason: str
    tokens_per_second: float
    seconds: float
    response: str
    model: str = ""  # the name the generation asked for: the tag, or its candidate before promotion


def smoke_options(test: SmokeTest, parameters: dict[str, Any]) -> dict[str, Any]:
    """The options one smoke generation runs with."""
    num_predict = LOAD_CHECK_NUM_PREDICT if test is LOAD_CHECK else parameters.get("num_predict", DEFAULT_NUM_PREDICT)
    options: dict[str, Any] = {"num_predict": num_predict, "seed": test.seed, "temperature": test.temperature}
    if "num_ctx" in parameters:
        options["num_ctx"] = parameters["num_ctx"]
    return options


def _judge(test: SmokeTest, text: str, rate: float, seconds: float) -> str:
    """Why a reply fails the test, or "" when it passes."""
    if test is LOAD_CHECK:
        return "" if seconds <= test.timeout_s else f"too slow: took {seconds:.1f} s, over {test.timeout_s:g} s"
    if not text.strip():
        return "empty reply"
    if not re.search(test.expect, text):
        return f"no match: the reply does not match {test.expect!r}"
    if rate < test.min_tokens_per_second:
        return f"too slow: {rate:.1f} tokens/s is below {test.min_tokens_per_second:g}"
    if seconds > test.timeout_s:
        return f"too slow: took {seconds:.1f} s, over {test.timeout_s:g} s"
    return ""


def run_smoke_test(host: OllamaHost, tag: str, test: SmokeTest, parameters: dict[str, Any], *,
                   model: str | None = None) -> SmokeResult:
    """One prompt against one tag (asked as `model`, its candidate say). A host that stops answering raises
    HostUnreachableError."""
    model = model or tag
    started = time.monotonic()
    try:
        reply = host.generate(model, test.prompt, smoke_options(test, parameters), test.keep_alive, test.timeout_s)
    except GenerateTimedOut:
        seconds = time.monotonic() - started
        return SmokeResult(host.name, tag, test.prompt, False, f"too slow: no reply within {test.timeout_s:g} s",
                           0.0, seconds, "", model)
    except GenerateFailed as e:
        message = str(e).split(": ", 2)[-1]
        return SmokeResult(host.name, tag, test.prompt, False, f"load error: {message}", 0.0,
                           time.monotonic() - started, "", model)
    seconds = time.monotonic() - started
    text = reply.response or ""
    rate = (reply.eval_count or 0) / reply.eval_duration * 1e9 if reply.eval_duration else 0.0
    reason = _judge(test, text, rate, seconds)
    return SmokeResult(host.name, tag, test.prompt, not reason, reason or "ok", rate, seconds, text[:200], model)


def run_smoke_tests(host: OllamaHost, tags: list[str], tests: list[SmokeTest], parameters: dict[str, Any], *,
                    models: dict[str, str] | None = None, cancel: CancelToken | None = None) -> list[SmokeResult]:
    """Every test against every tag (asked as `models[tag]` where given); with no tests, the load check. With
    `cancel`, an interrupt stops after the generation in flight (raises Interrupted)."""
    results = []
    for tag in tags:
        for test in tests or [LOAD_CHECK]:
            if cancel is not None:
                cancel.check()
            results.append(run_smoke_test(host, tag, test, parameters, model=(models or {}).get(tag)))
    return results
