"""Manifest v1: the declarative, user-facing contract (see README "Manifest").

Every model here is frozen and forbids unknown keys, so a typo is an error instead of a
silently ignored setting (base.Frozen). This module holds the build half (source, bake,
Modelfile, runtime) and the manifest itself; deploy_schema the hosts, rollout, smoke tests
and the quality gate.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, GetJsonSchemaHandler, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from ..builtin_templates import AUTO, BUILTINS
from .base import MAX_TIMEOUT_S, SLUG_RE, Frozen, base_dir, resolve_local
from .deploy_schema import REGISTRY_COMPONENT_RE, Distribution, Quality, Rollout, SmokeTest, Target
from .modelfile import ModelfileSyntaxError, quote
from .quant_types import lookup_quant_type, parse_split_size

API_VERSION = "so8t-deploy/v1"
DEFAULT_VARIANT = "default"

# Ollama's own limits: a model name is lowercase and short. Variant names use the same
# alphabet (base.SLUG_RE), so '{variant}-{quant}' is always a valid Ollama tag (at most 128 characters).
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
IMAGE_REF_RE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]*(:[\w][\w.-]{0,127})?$")
MAX_SCALE = 100.0  # a bake scale is a multiple of the trained adapter: 1.0 reproduces it
MAX_GPUS = 1024

# Options the Ollama server knows (server 0.32.x), by the type it expects.
OLLAMA_OPTION_TYPES: dict[str, type] = {
    **dict.fromkeys(
        ["num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
         "main_gpu", "num_thread"],
        int,
    ),
    **dict.fromkeys(
        ["top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
         "frequency_penalty"],
        float,
    ),
    "use_mmap": bool,
    "stop": list,
}
DEFAULT_PARAMETERS = {"temperature": 0.7}
# Ollama reads integer options into Go ints and float options into float32: keep both well inside, so a typo
# (an extra digit run) is an error here rather than an overflow on every host.
OPTION_INT_MAX = 2**31 - 1
OPTION_FLOAT_MAX = 1e6
# Ollama's limit on each part of a model name (namespace, model, tag), and the longest suffix this
# tool appends to a tag: `-rollback` holds the tag being replaced until the host has converged.
OLLAMA_NAME_PART_MAX = 80
TAG_SUFFIXES = ("-prev", "-rollback", "-candidate")  # desired.BACKUP_SUFFIX, ROLLBACK_SUFFIX, CANDIDATE_SUFFIX


class AdapterRef(Frozen):
    kind: Literal["so8t", "lora"] = Field(description="Adapter format: an SO8T v1 directory or a PEFT LoRA.")
    path: Path = Field(description="Adapter directory; relative paths resolve against the manifest's directory.")
    allow_base_mismatch: bool = Field(
        default=False,
        description="Bake even though the adapter's recorded base model (SO8T base_model, PEFT "
                    "base_model_name_or_path) names another model: for a local copy saved under another name.",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str | Path) and str(value).strip():
            return str(resolve_local(str(value), info))  # a str: JSON validation (the worker's) takes no Path
        raise ValueError("must be a non-empty path")


class Source(Frozen):
    model: str = Field(
        description="Base model: a local directory (relative to the manifest) or a Hugging Face hub repo id."
    )
    revision: str | None = Field(default=None, description="Commit or tag, for hub repo ids only.")
    adapters: list[AdapterRef] = Field(
        default_factory=list, description="Adapters folded into the base, in this order."
    )

    @field_validator("model")
    @classmethod
    def _resolve_model(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must name a local directory or a hub repo id")
        looks_local = value.startswith(("/", "./", "../", "~")) or (base_dir(info) / value).exists()
        if looks_local or not HUB_ID_RE.match(value):
            return str(resolve_local(value, info))
        return value

    @field_validator("revision")
    @classmethod
    def _revision_needs_hub_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        model = info.data.get("model")
        if value is not None and model is not None and Path(model).is_absolute():
            raise ValueError("applies only to hub repo ids, not to a local directory")
        return value

    @property
    def is_local(self) -> bool:
        return Path(self.model).is_absolute()


class Scales(Frozen):
    """Bake scales per adapter group; 1.0 reproduces the trained adapter, 0 disables the group."""

    rotation: float = Field(default=1.0, ge=-MAX_SCALE, le=MAX_SCALE,
                            description="Scale of attn_in, attn_out and final maps.")
    ffn: float = Field(default=1.0, ge=-MAX_SCALE, le=MAX_SCALE, description="Scale of mlp_in and mlp_out maps.")
    triality: float = Field(default=1.0, ge=-MAX_SCALE, le=MAX_SCALE,
                            description="Scale of the three triality maps.")

    def as_dict(self) -> dict[str, float]:
        return {"rotation": self.rotation, "ffn": self.ffn, "triality": self.triality}


class Bake(Frozen):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Output dtype of the baked model; auto keeps each tensor's source dtype."
    )
    variants: dict[str, Scales] = Field(
        default_factory=lambda: {DEFAULT_VARIANT: Scales()},
        description="Variant name -> bake scales. Absent means one variant called 'default' at scale 1.0.",
    )

    @field_validator("variants", mode="before")
    @classmethod
    def _none_means_empty_scales(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {name: ({} if scales is None else scales) for name, scales in value.items()}
        return value

    @field_validator("variants")
    @classmethod
    def _check_names(cls, value: dict[str, Scales]) -> dict[str, Scales]:
        if not value:
            raise ValueError("must name at least one variant (omit 'variants' for a single default one)")
        for name in value:
            if not SLUG_RE.match(name):
                raise ValueError(f"variant name {name!r} must match [a-z0-9][a-z0-9._-]*, at most 64 characters")
        return value


class Modelfile(Frozen):
    template: str = Field(
        default="auto",
        description="auto (the built-in that renders the model's own chat_template byte for byte), a built-in's "
                    "name (llama3.1, llama3.2, llama3.3, qwen2.5, mistral-nemo, phi3) or a path to a .j2 file.",
    )
    unchecked_template: str | None = Field(
        default=None,
        description="Skip the check that the template renders the model's own chat_template: must name the "
                    "template above (its built-in name or .j2 path), so the opt-out never carries over to another.",
    )
    system: str | None = Field(default=None, description="System prompt baked into every variant.")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Ollama options (temperature defaults to 0.7); stop tokens come from the template's end of "
                    "turn and the model's EOS, and any listed here are added.",
    )

    @field_validator("template")
    @classmethod
    def _resolve_template(cls, value: str, info: ValidationInfo) -> str:
        return _template_ref(value, info)

    @field_validator("unchecked_template")
    @classmethod
    def _names_the_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        resolved = _template_ref(value, info)
        if resolved != info.data.get("template"):
            raise ValueError(f"names {value!r}, but modelfile.template is {info.data.get('template')!r}: the "
                             "opt-out must name the template it exempts")
        return resolved

    @field_validator("system")
    @classmethod
    def _writable_in_a_modelfile(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                quote(value)
            except ModelfileSyntaxError as e:
                raise ValueError(str(e)) from None
        return value

    @field_validator("parameters")
    @classmethod
    def _check_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, option in value.items():
            expected = OLLAMA_OPTION_TYPES.get(key)
            if expected is None:
                raise ValueError(f"unknown Ollama option {key!r}")
            if not _option_has_type(option, expected):
                raise ValueError(f"option {key!r} must be of type {expected.__name__}, got {option!r}")
            limit = {int: OPTION_INT_MAX, float: OPTION_FLOAT_MAX}.get(expected)
            if limit is not None and not abs(option) <= limit:
                raise ValueError(f"option {key!r} must be from {-limit} to {limit}, got {option!r}")
            for text in (option if isinstance(option, list) else [option]):
                try:
                    quote(text)
                except ModelfileSyntaxError as e:
                    raise ValueError(f"option {key!r}: {e}") from None
        return value

    @property
    def effective_parameters(self) -> dict[str, Any]:
        return {**DEFAULT_PARAMETERS, **self.parameters}


def _template_ref(value: str, info: ValidationInfo) -> str:
    if value.endswith(".j2"):
        return str(resolve_local(value, info))
    if value != AUTO and value not in BUILTINS:
        raise ValueError(f"unknown built-in template {value!r} (known: {AUTO}, {', '.join(BUILTINS)}; or a .j2 path)")
    return value


def _option_has_type(value: Any, expected: type) -> bool:
    if expected is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, expected)


IMATRIX_MAX_CHUNKS = 100_000


class Imatrix(Frozen):
    """Calibration data for llama.cpp's importance matrix: computed once per variant from its float GGUF."""

    text: Path | None = Field(default=None, description="Plain text file to calibrate on (relative to the "
                              "manifest's directory).")
    chat: Path | None = Field(default=None, description="JSON Lines file, one conversation per line "
                              "({\"messages\": [{\"role\": ..., \"content\": ...}]}), rendered through the model's "
                              "own chat template before it is used.")
    chunks: int | None = Field(default=None, ge=1, le=IMATRIX_MAX_CHUNKS,
                               description="Use at most this many chunks of `ctx` tokens; default: all.")
    ctx: int = Field(default=512, ge=32, le=8192, description="Tokens per chunk (llama-imatrix's context size).")

    @field_validator("text", "chat", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if isinstance(value, str) and value.strip():
            return str(resolve_local(value, info))
        raise ValueError("must be a non-empty path")

    @model_validator(mode="after")
    def _one_source(self) -> Imatrix:
        if (self.text is None) == (self.chat is None):
            raise ValueError("declare exactly one of text: (a plain text file) or chat: (a .jsonl of conversations)")
        if self.chat is not None and self.chat.suffix != ".jsonl":
            raise ValueError(f"chat: {self.chat.name} must be a .jsonl file (one conversation per line)")
        return self

    @property
    def source(self) -> Path:
        path = self.text or self.chat
        assert path is not None  # _one_source
        return path


def _canonical_types(value: list[Any]) -> list[str]:
    if not value:
        raise ValueError("must list at least one quant type")
    names: list[str] = []
    for raw in value:
        if not isinstance(raw, str):
            raise ValueError(f"quant types are llama.cpp names such as q4_k_m, got {raw!r}")
        try:
            quant = lookup_quant_type(raw)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if quant.name in names:
            raise ValueError(f"duplicate quant type {quant.name!r}")
        names.append(quant.name)
    return names


class Quantize(Frozen):
    """The quant ladder: the types, the importance matrix they use, and the largest file written."""

    types: list[str] = Field(description="llama.cpp quant types, case-insensitive, no duplicates.")
    imatrix: Imatrix | None = Field(default=None, description="Compute an importance matrix from this calibration "
                                    "data and use it at every quant level; the IQ types and q2_k_s need one.")
    split_max_size: int | None = Field(default=None, description="Write a GGUF larger than this as llama.cpp split "
                                       "files (gguf-split's --split-max-size: a byte count, or 500M, 50G).")

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """A list of types, or the mapping: what `_list_means_types` accepts."""
        return {"anyOf": [{"type": "array", "items": {"type": "string"}}, handler(core_schema)],
                "description": cls.__doc__ and " ".join(cls.__doc__.split())}

    @model_validator(mode="before")
    @classmethod
    def _list_means_types(cls, value: Any) -> Any:
        # The types are checked here, before the fields: a bad name is then reported at `quantize`, where a
        # manifest that lists the types writes it, rather than at `quantize.types`, which it never wrote.
        if isinstance(value, list):
            value = {"types": value}
        if isinstance(value, dict) and isinstance(value.get("types"), list):
            value = {**value, "types": _canonical_types(value["types"])}
        return value

    @field_validator("split_max_size", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_split_size(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"must be a size such as 50G or a positive byte count, got {value!r}")
        return value

    @model_validator(mode="after")
    def _imatrix_where_needed(self) -> Quantize:
        if self.imatrix is None:
            needing = [name for name in self.types if lookup_quant_type(name).wants_imatrix]
            if needing:
                raise ValueError(f"{', '.join(needing)} {'needs' if len(needing) == 1 else 'need'} an importance "
                                 "matrix: declare quantize.imatrix (text: or chat: calibration data)")
        return self


class Runtime(Frozen):
    backend: Literal["local", "docker"] = Field(
        default="local", description="Where bake/convert/quantize run: in-process, or in a worker container."
    )
    image: str = Field(default="so8t-deploy-worker:latest", description="Worker image for the docker backend.")
    gpus: Literal["none", "all"] | int = Field(
        default="none", description="GPUs for the worker container: none, all, or a count."
    )
    timeout_s: float = Field(default=6 * 3600, gt=0, le=MAX_TIMEOUT_S,
                             description="Longest a worker container may run, in seconds.")

    @field_validator("gpus", mode="before")
    @classmethod
    def _check_gpus(cls, value: Any) -> Any:
        if value in ("none", "all") or (type(value) is int and 1 <= value <= MAX_GPUS):
            return value
        raise ValueError(f"must be 'none', 'all' or a positive count (at most {MAX_GPUS}), got {value!r}")

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str) -> str:
        if not IMAGE_REF_RE.match(value):
            raise ValueError(f"invalid image reference {value!r}")
        return value


class Manifest(Frozen):
    api_version: Literal["so8t-deploy/v1"] = Field(alias="apiVersion", description="Always so8t-deploy/v1.")
    name: str = Field(description="Ollama model name: lowercase [a-z0-9][a-z0-9._-]*, at most 64 characters.")
    source: Source = Field(description="The base model (a local directory or a hub repo id, at a revision) and the "
                           "adapters folded into it, in order.")
    bake: Bake = Field(default_factory=Bake, description="How the adapters are folded: the output dtype, and the "
                       "variants, each with its own scales per adapter group.")
    quantize: Quantize = Field(description="The quant ladder: a list of llama.cpp types, or a mapping of types:, "
                               "imatrix: (calibration data) and split_max_size:.")
    modelfile: Modelfile = Field(default_factory=Modelfile, description="What every tag's Modelfile says: the "
                                 "chat template, the system prompt and the Ollama parameters.")
    runtime: Runtime = Field(default_factory=Runtime, description="Where bake, convert and quantize run: in this "
                             "process, or in a worker container (image, GPUs, timeout).")
    targets: list[Target] = Field(default_factory=list, description="Ollama hosts; empty means build only.")
    rollout: Rollout = Field(default_factory=Rollout, description="How the hosts are updated: canaries first, "
                             "parallelism, what a failed host means for the others, and pruning.")
    smoke: list[SmokeTest] = Field(default_factory=list, description="Prompts every deployed variant must pass.")
    quality: Quality = Field(default_factory=Quality, description="Quant quality evaluation and gate.")
    distribution: Distribution = Field(default_factory=Distribution, description="How the GGUFs reach the hosts: "
                                       "`push` (uploaded to each host) or `registry:` (published once, pulled by "
                                       "every host).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not MODEL_NAME_RE.match(value):
            raise ValueError(f"model name {value!r} must match [a-z0-9][a-z0-9._-]*, at most 64 characters")
        return value

    @field_validator("targets")
    @classmethod
    def _unique_target_names(cls, value: list[Target]) -> list[Target]:
        seen: set[str] = set()
        for target in value:
            if target.name in seen:
                raise ValueError(f"duplicate target name {target.name!r}")
            seen.add(target.name)
        return value

    @field_validator("targets")
    @classmethod
    def _targets_take_one_file(cls, value: list[Target], info: ValidationInfo) -> list[Target]:
        quantize = info.data.get("quantize")
        if value and quantize is not None and quantize.split_max_size is not None:
            raise ValueError(f"{value[0].name!r}: Ollama cannot import split GGUFs (its create takes one file per "
                             "model layer); remove quantize.split_max_size to deploy, or the targets to only build")
        return value

    @field_validator("distribution")
    @classmethod
    def _name_fits_registry(cls, value: Distribution, info: ValidationInfo) -> Distribution:
        name = info.data.get("name")
        if value.registry is not None and name is not None and not REGISTRY_COMPONENT_RE.match(name):
            raise ValueError(f"the model name {name!r} cannot be an OCI repository name: lowercase letters and "
                             "digits joined by '.', '_' or '-', with no separator at either end or two in a row")
        return value

    @field_validator("quality")
    @classmethod
    def _held_out(cls, value: Quality, info: ValidationInfo) -> Quality:
        quantize = info.data.get("quantize")
        imatrix = quantize.imatrix if quantize is not None else None
        if imatrix is not None and value.eval_text is not None and value.eval_text == imatrix.source:
            raise ValueError("eval_text is the importance matrix's calibration data: evaluate on held-out text")
        return value

    @field_validator("rollout")
    @classmethod
    def _canary_within_targets(cls, value: Rollout, info: ValidationInfo) -> Rollout:
        targets = info.data.get("targets") or []
        if targets and value.canary > len(targets):
            raise ValueError(f"canary {value.canary} exceeds the number of targets ({len(targets)})")
        return value

    @model_validator(mode="after")
    def _tags_fit_ollama(self) -> Manifest:
        longest = max(TAG_SUFFIXES, key=len)
        for variant in self.bake.variants:
            for quant in self.quantize.types:
                tag = self.tag(variant, quant).split(":", 1)[1]
                if len(tag) + len(longest) > OLLAMA_NAME_PART_MAX:
                    raise ValueError(f"bake.variants.{variant}: the tag {tag!r} plus its suffix "
                                     f"{longest!r} is longer than Ollama's {OLLAMA_NAME_PART_MAX} "
                                     "characters; shorten the variant name")
        return self

    @property
    def single_default_variant(self) -> bool:
        return list(self.bake.variants) == [DEFAULT_VARIANT]

    def tags(self) -> list[str]:
        """Every tag the manifest names, variant by variant."""
        return [self.tag(variant, quant) for variant in self.bake.variants for quant in self.quantize.types]

    def tag(self, variant: str, quant: str) -> str:
        """Ollama tag of one variant at one quant level."""
        suffix = quant if self.single_default_variant else f"{variant}-{quant}"
        return f"{self.name}:{suffix}"
