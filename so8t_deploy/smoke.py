"""Smoke tests: every deployed tag must answer each prompt, in time, fast enough, matching `expect`."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .errors import HostError
from .external.ollama_host import OllamaHost
from .manifest import SmokeTest

# Bounds the reply (a smoke prompt needs a few words); the manifest's own num_predict wins.
DEFAULT_NUM_PREDICT = 64


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


def smoke_options(parameters: dict) -> dict:
    """The options a smoke test runs with: the shipped num_ctx (Phi-3.5's longrope depends on it)."""
    options = {"num_predict": parameters.get("num_predict", DEFAULT_NUM_PREDICT)}
    if "num_ctx" in parameters:
        options["num_ctx"] = parameters["num_ctx"]
    return options


def run_smoke_test(host: OllamaHost, tag: str, test: SmokeTest, options: dict) -> SmokeResult:
    started = time.monotonic()
    try:
        reply = host.generate(tag, test.prompt, options, timeout=test.timeout_s)
    except HostError as e:
        return SmokeResult(host.name, tag, test.prompt, False, str(e).split(": ", 1)[-1], 0.0,
                           time.monotonic() - started, "")
    seconds = time.monotonic() - started
    text = reply.response or ""
    rate = (reply.eval_count or 0) / reply.eval_duration * 1e9 if reply.eval_duration else 0.0
    if not re.search(test.expect, text):
        reason = f"reply does not match {test.expect!r}"
    elif rate < test.min_tokens_per_second:
        reason = f"{rate:.1f} tokens/s is below {test.min_tokens_per_second:g}"
    elif seconds > test.timeout_s:
        reason = f"took {seconds:.1f} s, over {test.timeout_s:g} s"
    else:
        reason = ""
    return SmokeResult(host.name, tag, test.prompt, not reason, reason or "ok", rate, seconds, text[:200])


def run_smoke_tests(host: OllamaHost, tags: list[str], tests: list[SmokeTest], parameters: dict) -> list[SmokeResult]:
    options = smoke_options(parameters)
    return [run_smoke_test(host, tag, test, options) for tag in tags for test in tests]
