"""Models in memory, the sampling options of api.DefaultOptions, and generation with llama.cpp."""

from __future__ import annotations

import codecs
import contextlib
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .common import ApiError, go_time, log
from .names import ModelName

if TYPE_CHECKING:
    from .api import ModelView


# --- models in memory, options, generation --------------------------------------------------------------

@dataclass
class Loaded:
    model: ModelView
    llm: object
    key: tuple  # the runner options it was loaded with
    expires_at: float | None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Models:
    """The llama.cpp models in memory. Unloading only drops the reference: a running generation keeps its own."""

    def __init__(self) -> None:
        self.loaded: dict[ModelName, Loaded] = {}
        self.lock = threading.Lock()

    def expire(self) -> None:
        with self.lock:
            for name, entry in list(self.loaded.items()):
                if entry.expires_at is not None and entry.expires_at < time.time():
                    del self.loaded[name]

    def unload(self, name: ModelName) -> None:
        with self.lock:
            self.loaded.pop(name, None)

    def load(self, model: ModelView, opts: Options, keep_alive: float | None) -> tuple[Loaded, int]:
        """The loaded model (loading or reloading it as needed) and the load time in ns."""
        import llama_cpp

        self.expire()
        start = time.perf_counter_ns()
        key = (opts.num_ctx, opts.num_batch, opts.repeat_last_n)
        with self.lock:
            entry = self.loaded.get(model.name)
            if entry is None or entry.key != key or entry.model.manifest.digest != model.manifest.digest:
                try:
                    llm = llama_cpp.Llama(str(model.path), n_ctx=opts.num_ctx, n_batch=opts.num_batch,
                                          last_n_tokens_size=opts.repeat_last_n, n_threads=2, verbose=False)
                except Exception as exc:  # llama.cpp reports load failures as ValueError/RuntimeError
                    raise ApiError(500, f"llama runner process has terminated: {exc}") from None
                entry = self.loaded[model.name] = Loaded(model, llm, key, None)
            entry.expires_at = None if keep_alive is None else time.time() + keep_alive
        return entry, time.perf_counter_ns() - start

    def ps(self) -> list[dict]:
        self.expire()
        with self.lock:
            entries = list(self.loaded.values())
        return [{"name": e.model.name.display(), "model": e.model.name.display(), "size": e.model.manifest.size,
                 "digest": e.model.manifest.digest, "details": e.model.details(), "expires_at":
                 go_time(int((e.expires_at or 4102444800) * 1e9)), "size_vram": 0, "context_length": e.key[0]}
                for e in entries]


# api.Options: JSON key -> Go kind, and api.DefaultOptions (num_ctx comes from the server, see default_num_ctx).
OPTION_KINDS = {"num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float, "min_p": float,
                "typical_p": float, "repeat_last_n": int, "temperature": float, "repeat_penalty": float,
                "presence_penalty": float, "frequency_penalty": float, "stop": list, "num_ctx": int,
                "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool, "num_thread": int}
DEFAULT_OPTIONS = {"num_predict": -1, "num_keep": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
                   "typical_p": 1.0, "repeat_last_n": 64, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "seed": -1, "stop": [], "num_batch": 512, "num_gpu": -1,
                   "main_gpu": 0, "use_mmap": None, "num_thread": 0}


def default_num_ctx() -> int:
    """OLLAMA_CONTEXT_LENGTH, else the VRAM tier's default: 4096 on a machine without a big GPU."""
    with contextlib.suppress(ValueError):
        if (n := int(os.environ.get("OLLAMA_CONTEXT_LENGTH") or 0)) > 0:
            return n
    return 4096


@dataclass
class Options:
    num_predict: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    repeat_last_n: int
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: list[str]
    num_ctx: int
    num_batch: int

    @classmethod
    def build(cls, model_params: dict, request_options: dict | None) -> Options:
        """DefaultOptions, then the model's PARAMETERs, then the request's options (api.Options.FromMap)."""
        values = {**DEFAULT_OPTIONS, "num_ctx": default_num_ctx()}
        for layer in (model_params, request_options or {}):
            for key, value in layer.items():
                if key not in OPTION_KINDS:
                    log(f"invalid option provided: {key}")  # Ollama only logs unknown options
                elif value is not None:
                    values[key] = _option_value(key, value)
        values["num_ctx"] = max(values["num_ctx"], 4)
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})


def _option_value(key: str, value: object) -> object:
    kind = OPTION_KINDS[key]
    if kind is list:
        if not isinstance(value, list):
            raise ApiError(500, f'option "{key}" must be of type array')
        if not all(isinstance(v, str) for v in value):
            raise ApiError(500, f'option "{key}" must be of an array of strings')
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ApiError(500, f'option "{key}" must be of type boolean')
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(500, f'option "{key}" must be of type {"integer" if kind is int else "float32"}')
    return int(value) if kind is int else float(value)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still be the start of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def generate_pieces(loaded: Loaded, prompt: str, opts: Options, stats: dict) -> Iterator[str]:
    """Run llama.cpp; yield text pieces and fill `stats` with counts, durations (ns) and done_reason."""
    import llama_cpp

    llm = loaded.llm
    with loaded.lock:
        start = time.perf_counter_ns()
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        limit = opts.num_ctx - len(tokens)
        if limit <= 0:
            raise ApiError(400, f"prompt is {len(tokens)} tokens, more than num_ctx {opts.num_ctx}")
        # num_predict -1 is bounded to 10 contexts, as Ollama bounds it; here the context ends first.
        limit = min(opts.num_predict if opts.num_predict >= 0 else 10 * opts.num_ctx, limit)
        llm.set_seed(opts.seed if opts.seed >= 0 else random.getrandbits(31))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending, count, first_at, reason = "", 0, None, "length"
        stats.update(prompt_eval_count=len(tokens), context=list(tokens))
        generator = llm.generate(tokens, top_k=opts.top_k, top_p=opts.top_p, min_p=opts.min_p,
                                 typical_p=opts.typical_p, temp=opts.temperature, repeat_penalty=opts.repeat_penalty,
                                 presence_penalty=opts.presence_penalty, frequency_penalty=opts.frequency_penalty)
        for token in generator if limit else ():
            first_at = first_at or time.perf_counter_ns()
            count += 1  # like Ollama's runner, which counts the end-of-generation token too
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                reason = "stop"
                break
            stats["context"].append(token)
            pending += decoder.decode(llm.detokenize([token], special=True))
            hit = min((pending.find(s) for s in opts.stop if s in pending), default=-1)
            if hit >= 0:
                pending, reason = pending[:hit], "stop"
                break
            keep = _held_back(pending, opts.stop)
            if len(pending) > keep:
                yield pending[:len(pending) - keep]
                pending = pending[len(pending) - keep:]
            if count >= limit:
                break
        generator.close()
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending
        end = time.perf_counter_ns()
        first_at = first_at or end
        stats.update(done_reason=reason, eval_count=count, prompt_eval_duration=max(1, first_at - start),
                     eval_duration=max(1, end - first_at) if count else 0)


def canned_pieces(text: str, prompt: str, tokens_per_second: float, stats: dict) -> Iterator[str]:
    """The `generate_response` fault: fixed text, word pieces as tokens, durations at the configured speed."""
    pieces = re.findall(r"\s*\S+", text) or [text]
    yield from (p for p in pieces if p)
    count = len(pieces)
    stats.update(done_reason="stop", eval_count=count, prompt_eval_count=max(1, len(prompt) // 4), context=[],
                 prompt_eval_duration=1_000_000, eval_duration=int(count * 1e9 / max(tokens_per_second, 1e-6)))
