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
from ..chat.fidelity import compare_rendered
from ..external.ollama_host import GenerateFailed, GenerateTimedOut, OllamaHost
from ..manifest.deploy_schema import SmokeTest
from .desired import DesiredModel

# Bounds the reply (a smoke prompt needs a few words); the manifest's own num_predict wins.
DEFAULT_NUM_PREDICT = 64
# With no smoke tests declared, a candidate must still load and generate before it goes live; what it says
# is not judged (any reply, an empty one included, passes).
LOAD_CHECK = SmokeTest(prompt="Hello.", expect="", timeout_s=300)
LOAD_CHECK_NUM_PREDICT = 1
RENDER_TIMEOUT_S = 300.0  # rendering loads the model first, as a generation does
CANNOT_RENDER = "skipped: the host cannot render a conversation without generating (_debug_render_only)"


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
    kind: str = "prompt"  # or "conversation": a check of what the host serves (check_served_template)


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


def _conversation_result(host: OllamaHost, tag: str, model: str, what: str, reason: str) -> SmokeResult:
    return SmokeResult(host.name, tag, what, not reason or reason == CANNOT_RENDER, reason or "ok", 0.0, 0.0, "",
                       model, kind="conversation")


def check_served_template(host: OllamaHost, desired: DesiredModel, model: str) -> list[SmokeResult]:
    """What the host serves for `model` is the conversation the model was trained on: it renders the TEMPLATE
    sent (not the GGUF's own Jinja template), lists the capabilities the model's template has, and renders each
    fixed conversation as the model's own template does. A host without `_debug_render_only` skips the last part
    (a result whose reason is CANNOT_RENDER)."""
    shown = host.show(model)
    if shown is None:
        return [_conversation_result(host, desired.tag, model, "template", "load error: the host lost the model")]
    if shown.template != desired.template:
        return [_conversation_result(host, desired.tag, model, "template", (
            "host renders the GGUF's own chat template, not the TEMPLATE sent (Ollama prefers it when it "
            "advertises capabilities, such as tools or thinking, that the TEMPLATE lacks)"
            if shown.sent_template == desired.template else "host shows another TEMPLATE than the one sent"))]
    missing = [c for c in desired.capabilities if shown.capabilities is not None and c not in shown.capabilities]
    if missing:
        return [_conversation_result(host, desired.tag, model, "capabilities", (
            f"host does not list the {missing[0]!r} capability, which the model's own chat template has"))]
    results = []
    for expected in desired.expected_renders:
        what = f"conversation: {expected.conversation}"
        try:
            rendered = host.render_chat(model, [dict(m) for m in expected.messages], RENDER_TIMEOUT_S,
                                        think=expected.think)
        except GenerateTimedOut:
            return [_conversation_result(host, desired.tag, model, what, (
                f"too slow: not rendered within {RENDER_TIMEOUT_S:g} s"))]
        except GenerateFailed as e:  # the model did not load: the host renders only once it has
            return [_conversation_result(host, desired.tag, model, what, f"load error: {_server_message(e)}")]
        if rendered is None:
            return [_conversation_result(host, desired.tag, model, "conversations", CANNOT_RENDER)]
        mismatch = compare_rendered(expected, rendered)
        reason = f"host renders another prompt: {mismatch.describe()}" if mismatch else ""
        results.append(_conversation_result(host, desired.tag, model, what, reason))
    return results


def _server_message(error: GenerateFailed) -> str:
    return str(error).split(": ", 2)[-1]  # less "host (url): what: "


def run_smoke_test(host: OllamaHost, tag: str, test: SmokeTest, parameters: dict[str, Any], *,
                   model: str | None = None, think: bool | None = None) -> SmokeResult:
    """One prompt against one tag (asked as `model`, its candidate say). A host that stops answering raises
    HostUnreachableError."""
    model = model or tag
    started = time.monotonic()
    try:
        reply = host.generate(model, test.prompt, smoke_options(test, parameters), test.keep_alive, test.timeout_s,
                              think=think)
    except GenerateTimedOut:
        seconds = time.monotonic() - started
        return SmokeResult(host.name, tag, test.prompt, False, f"too slow: no reply within {test.timeout_s:g} s",
                           0.0, seconds, "", model)
    except GenerateFailed as e:
        return SmokeResult(host.name, tag, test.prompt, False, f"load error: {_server_message(e)}", 0.0,
                           time.monotonic() - started, "", model)
    seconds = time.monotonic() - started
    text = reply.response or ""
    rate = (reply.eval_count or 0) / reply.eval_duration * 1e9 if reply.eval_duration else 0.0
    reason = _judge(test, text, rate, seconds)
    return SmokeResult(host.name, tag, test.prompt, not reason, reason or "ok", rate, seconds, text[:200], model)


def run_smoke_tests(host: OllamaHost, tags: list[str], tests: list[SmokeTest], parameters: dict[str, Any], *,
                    models: dict[str, str] | None = None, cancel: CancelToken | None = None,
                    desired: dict[str, DesiredModel] | None = None) -> list[SmokeResult]:
    """Every test against every tag (asked as `models[tag]` where given); with no tests, the load check. Where
    `desired` describes a tag, its served template is checked first (check_served_template), and a thinking model
    is asked with `think: false`, so that its answer is in `response`. With `cancel`, an interrupt stops after the
    generation in flight (raises Interrupted)."""
    results = []
    for tag in tags:
        model = (models or {}).get(tag, tag)
        wanted = (desired or {}).get(tag)
        if wanted is not None:
            results += check_served_template(host, wanted, model)
        think = False if wanted is not None and "thinking" in wanted.capabilities else None
        for test in tests or [LOAD_CHECK]:
            if cancel is not None:
                cancel.check()
            results.append(run_smoke_test(host, tag, test, parameters, model=model, think=think))
    return results
