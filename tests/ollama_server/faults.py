"""The test-only faults (POST /_test/faults), the create rules among them."""

from __future__ import annotations

from dataclasses import dataclass

from .common import ApiError
from .names import ModelName

FAULT_DEFAULTS: dict = {
    "cut_upload_after_bytes": None,  # next blob upload: read N bytes, then reset the connection
    "cut_upload_times": 1,  # how many uploads in a row cut_upload_after_bytes cuts
    # next pull(s): fetch N bytes of the first blob the pull downloads (none if every blob is stored), keep the
    # partial, and fail in-stream with "max retries exceeded: unexpected EOF", what Ollama answers once its six
    # retries of a part that keeps breaking off are spent (without their 63 s of back-off); the next pull resumes
    # the partial. A blob of N bytes or fewer downloads whole.
    "fail_pull_after_bytes": None,
    "fail_pull_times": 1,  # how many pulls in a row fail_pull_after_bytes fails
    # only pulls of this model: HOST/NAMESPACE/MODEL:TAG, or its end after a "/" or ":" ("MODEL:TAG", "TAG");
    # case-insensitive. None: every pull. Other pulls neither fail nor count down fail_pull_times.
    "fail_pull_model": None,
    "fail_generate": False,  # generate/chat answer 500 "injected failure"
    "generate_response": None,  # generate/chat answer this text instead of running llama.cpp
    "generate_tokens_per_second": 50.0,  # the speed reported for generate_response
    "generate_delay_s": 0.0,  # generate/chat wait this long before they start (a slow model)
    "ignore_debug_render": False,  # an Ollama older than _debug_render_only: chat generates instead
    "prompt_suffix": "",  # appended to every prompt the server renders (a host whose templates render otherwise)
    "create_rules": [],  # see CreateRules
    "create_stream_error": None,  # shorthand for one rule {"model": "*", "action": "fail_stream", "times": 1}
    "version": None,  # overrides --version ("0.0.0" is what a source build reports)
}


@dataclass
class CreateFaults:
    """What the create rules decided for one create."""

    fail_http: dict | None = None
    fail_stream: dict | None = None
    silence_s: float = 0.0


class CreateRules:
    """`create_rules`: [{"model": "name:tag" | "*", "action": "silence" | "fail_http" | "fail_stream",
    "seconds": float (silence), "status": int (fail_http, default 500), "message": str,
    "times": int | null (null: every time)}]. The first matching rule of each action applies to a create."""

    KEYS = {"model", "action", "seconds", "status", "message", "times"}

    @classmethod
    def check(cls, rules: object) -> list[dict]:
        if not isinstance(rules, list):
            raise ApiError(400, "create_rules must be a list")
        return [cls._check_rule(rule) for rule in rules]

    @classmethod
    def _check_rule(cls, rule: object) -> dict:
        if not isinstance(rule, dict) or set(rule) - cls.KEYS:
            raise ApiError(400, f"a create rule is an object with keys {sorted(cls.KEYS)}: {rule!r}")
        action, model, times = rule.get("action"), rule.get("model", "*"), rule.get("times")
        if action not in ("silence", "fail_http", "fail_stream"):
            raise ApiError(400, f"unknown create rule action {action!r}")
        if model != "*" and ModelName.parse(model) is None:
            raise ApiError(400, f"create rule model {model!r} is not a model name or '*'")
        if times is not None and (not isinstance(times, int) or times < 0):
            raise ApiError(400, "create rule times must be a count or null")
        seconds, status = rule.get("seconds", 0.0), rule.get("status", 500)
        if not isinstance(seconds, int | float) or seconds < 0 or not isinstance(status, int):
            raise ApiError(400, "create rule seconds must be a duration, status an HTTP status")
        return {"model": model, "action": action, "seconds": float(seconds), "status": status,
                "message": str(rule.get("message") or f"injected {action}"), "times": times}

    @staticmethod
    def take(rules: list[dict], name: ModelName) -> CreateFaults:
        """The faults for a create of `name`, counting each applied rule down."""
        faults = CreateFaults()
        for rule in rules:
            if rule["times"] == 0:
                continue
            if rule["model"] != "*" and not ModelName.parse(rule["model"]).same(name):
                continue
            action = rule["action"]
            if action == "silence" and not faults.silence_s:
                faults.silence_s = rule["seconds"]
            elif action in ("fail_http", "fail_stream") and getattr(faults, action) is None:
                setattr(faults, action, rule)
            else:
                continue
            if rule["times"] is not None:
                rule["times"] -= 1
        return faults
