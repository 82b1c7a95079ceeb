"""The deploy half of the manifest: the hosts (URL, headers), the rollout policy, the smoke tests, the quality gate.

Host credentials live in `headers:` only, and are secrets: a header value is checked here, at `validate`, as
an HTTP header value, and no message ever quotes it. A URL with credentials is refused with its password masked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    GetJsonSchemaHandler,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from .base import MAX_TIMEOUT_S, SLUG_RE, Frozen, resolve_local

DEFAULT_SMOKE_SEED = 42
MAX_PARALLELISM = 256
GO_DURATION_RE = re.compile(r"^-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$|^-?\d+(\.\d+)?$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9-]+$")
# The scheme and its '//' (either may be missing), then everything up to the last '@': the userinfo, whatever
# characters it holds ('/', '?' and '#' in a password make urlsplit cut the netloc short, so it is not asked).
_USERINFO_RE = re.compile(r"^(?P<prefix>(?:[A-Za-z][A-Za-z0-9+.-]*:)?//|)(?P<userinfo>.*)@", re.DOTALL)
_QUERY_RE = re.compile(r"[?#].*", re.DOTALL)


def mask_credentials(url: str) -> str:
    """`url` as it may be shown: 'user:pass@' becomes 'user:***@', a userinfo with no password (often a token
    on its own) is masked whole, and so is a query (`?token=...`)."""

    def mask(match: re.Match[str]) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        return f"{match['prefix']}{user + ':***' if colon else '***'}@"

    return _QUERY_RE.sub("?***", _USERINFO_RE.sub(mask, url, count=1), count=1)


def normalize_host_url(value: str) -> str:
    """Return ``scheme://host[:port]`` or raise ValueError naming the URL, its credentials masked.

    A URL with credentials is refused, not stripped: stripping would send the requests unauthenticated and
    leave the password in the manifest, where it looks as if it were used."""
    shown = mask_credentials(value)
    if "@" in value:  # no host URL has one anywhere else
        raise ValueError(f"a URL with credentials ({shown!r}): put them in headers: instead "
                         "(e.g. Authorization: \"Bearer ${OLLAMA_TOKEN}\")")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # urllib's own message may quote the URL
        raise ValueError(f"invalid URL {shown!r}: cannot be parsed, or the port is not a number from 0 to "
                         "65535") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"invalid URL {shown!r}: scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"invalid URL {shown!r}: no host")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(f"invalid URL {shown!r}: expected scheme://host[:port] with no path")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot be sent as an HTTP header value, in words that never quote it; None when it can.

    Allowed: visible ASCII and inner spaces. Anything else is refused rather than encoded on the way out."""
    stripped = value.rstrip("\r\n")
    if stripped != value and not any(c in stripped for c in "\r\n"):
        return "ends with a line break (a token read from a file with its newline?): strip it"
    if any(c in value for c in "\r\n"):
        return "contains a line break"
    control = next((c for c in value if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if control is not None:
        return f"contains a control character (U+{ord(control):04X})"
    if value != value.strip(" "):
        return "starts or ends with a space: strip it"
    if not value.isascii():
        return ("contains non-ASCII characters: a header value must be visible ASCII; percent-encode them "
                "(or encode them as your server expects)")
    return None


def _check_header_value(value: SecretStr) -> SecretStr:
    problem = header_value_problem(value.get_secret_value())
    if problem is not None:
        raise ValueError(problem)
    return value


HeaderValue = Annotated[SecretStr, AfterValidator(_check_header_value)]


class Target(Frozen):
    name: str = Field(description="Short host name used in plans and reports.")
    host: str = Field(description="Ollama server URL, http(s)://host[:port], with no credentials (use headers).")
    headers: dict[str, HeaderValue] = Field(
        default_factory=dict, description="Extra HTTP headers (e.g. Authorization): visible ASCII, no leading or "
        "trailing space; values are secrets, never printed.",
    )
    timeout_s: float = Field(
        default=30, gt=0, le=MAX_TIMEOUT_S,
        description="Read timeout of every call to this host but create, upload and smoke generation. A create "
        "waits 10 minutes plus 1 s per 8 MiB of GGUF: Ollama rewrites the file silently.",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not SLUG_RE.match(value):
            raise ValueError(f"target name {value!r} must match [a-z0-9][a-z0-9._-]*")
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return normalize_host_url(value.strip())

    @field_validator("headers")
    @classmethod
    def _check_header_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name in value:
            if not HEADER_NAME_RE.match(name):
                raise ValueError(f"invalid HTTP header name {name!r}")
        return value


class Rollout(Frozen):
    canary: int = Field(default=1, ge=0, le=1024, description="How many targets (in order) are rolled out first.")
    parallelism: int = Field(default=4, ge=1, le=MAX_PARALLELISM,
                             description="Hosts worked on at once after the canaries.")
    on_failure: Literal["rollback", "halt", "continue"] = Field(
        default="rollback", description="What a failed smoke test does: restore the backup, stop, or go on."
    )
    prune: bool = Field(
        default=False, description="Delete models in this name's namespace that the manifest no longer names."
    )


class SmokeTest(Frozen):
    prompt: str = Field(min_length=1, description="Prompt sent to every variant on every host.")
    expect: str = Field(default=".", description="Regular expression the response must match (re.search).")
    timeout_s: float = Field(default=120, gt=0, le=MAX_TIMEOUT_S,
                             description="Seconds allowed for the whole generation.")
    min_tokens_per_second: float = Field(default=0, ge=0, le=1e9, description="Minimum eval_count / eval_duration.")
    seed: int = Field(default=DEFAULT_SMOKE_SEED, ge=-1, le=2**31 - 1,
                      description="Sampling seed sent with the prompt, so a smoke test means the same on every "
                      "host (-1: random).")
    temperature: float = Field(default=0.0, ge=0, le=100, description="Sampling temperature; 0 is greedy.")
    keep_alive: int | float | str = Field(
        default=0, description="How long the host keeps the model loaded after the test: seconds (at most a week "
        "either way) or a Go duration ('5m'); 0 unloads it at once, so a rollout never evicts the models serving "
        "production.",
    )

    # Before pydantic's union: it would report a non-finite number once per member of the union.
    @field_validator("keep_alive", mode="before")
    @classmethod
    def _check_keep_alive(cls, value: Any) -> Any:
        if isinstance(value, str) and not GO_DURATION_RE.match(value):
            raise ValueError(f"must be seconds or a Go duration such as '5m', got {value!r}")
        if isinstance(value, int | float) and not abs(value) <= MAX_TIMEOUT_S:  # also refuses nan
            raise ValueError(f"must be a number of seconds from {-MAX_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}")
        return value

    @field_validator("expect")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"invalid regular expression {value!r}: {e}") from None
        return value


class Quality(Frozen):
    """The quant quality gate: each quant level against its variant's float GGUF (`so8t-deploy eval`)."""

    eval_text: Path | None = Field(default=None, description="Text to evaluate on; default: a short text shipped "
                                   "with so8t-deploy. Relative to the manifest's directory.")
    windows: int = Field(default=4, ge=1, le=256, description="How many token windows of the text to evaluate.")
    context: int = Field(default=128, ge=16, le=8192, description="Tokens per window.")
    max_mean_kl: float | None = Field(default=None, gt=0, le=1e6, description="Gate: a tag whose mean KL "
                                      "divergence from the reference exceeds this is not rolled out.")
    min_top1: float | None = Field(default=None, ge=0, le=1, description="Gate: a tag whose top-1 agreement "
                                   "with the reference is below this is not rolled out.")

    @field_validator("eval_text", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return str(resolve_local(value, info)) if isinstance(value, str) and value.strip() else value

    @property
    def gated(self) -> bool:
        return self.max_mean_kl is not None or self.min_top1 is not None


OLLAMA_DEFAULT_HOST = "registry.ollama.ai"  # the host of a model name that has none (types/model/name.go)
# Ollama's name parts (types/model/name.go): a host is [A-Za-z0-9_][A-Za-z0-9_.:-]*, at most 350 characters.
OLLAMA_HOST_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$")
# A repository path component both Ollama (a namespace has no '.') and CNCF distribution
# (reference/regexp.go: lowercase alphanumerics joined by '.', '_', '__' or dashes) accept.
REGISTRY_NAMESPACE_RE = re.compile(r"^[a-z0-9]+(?:(?:_|__|-+)[a-z0-9]+)*$")
REGISTRY_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


class RegistryAuth(Frozen):
    """Push credentials: interpolate them from the environment (`${REGISTRY_PASSWORD}`); never printed."""

    username: str = Field(min_length=1, description="User name (ECR: AWS; a robot account on Harbor).")
    password: HeaderValue = Field(description="Password or token (ECR: `aws ecr get-login-password`); a secret.")

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str) -> str:
        if ":" in value:
            raise ValueError("contains ':', which basic authentication cannot carry")
        if (problem := header_value_problem(value)) is not None:
            raise ValueError(problem)
        return value


class Registry(Frozen):
    url: str = Field(description="The registry, http(s)://host[:port] with no path: the address the controller "
                     "pushes to and every host pulls from.")
    namespace: str = Field(description="The repository namespace: images are NAMESPACE/NAME:TAG (a Harbor "
                           "project, an ECR repository prefix).")
    insecure: bool = Field(default=False, description="Plain HTTP: Ollama's `insecure` pull speaks http, so an "
                           "http:// URL needs it and an https:// URL must not have it.")
    auth: RegistryAuth | None = Field(default=None, description="Credentials for pushing (basic, or a token "
                                      "fetched with them); hosts always pull anonymously.")
    timeout_s: float = Field(default=30, gt=0, le=MAX_TIMEOUT_S,
                             description="Read timeout of every registry call but blob uploads, which scale with "
                             "the blob.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if "@" in value:
            raise ValueError(f"a URL with credentials ({mask_credentials(value)!r}): put them in "
                             "distribution.registry.auth, from the environment")
        url = normalize_host_url(value.strip())
        host = url.split("://", 1)[1]
        if urlsplit(url).hostname == OLLAMA_DEFAULT_HOST:
            raise ValueError(f"{OLLAMA_DEFAULT_HOST} is Ollama's own registry: Ollama lists its models without the "
                             "host, as local models, and pushing there needs Ollama's signed keys; use your own "
                             "registry")
        if not OLLAMA_HOST_PART_RE.match(host):
            raise ValueError(f"registry host {host!r} is not one Ollama can pull from (letters, digits, '.', '_', "
                             "'-' and a ':port'; no IPv6 literal)")
        return url

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if len(value) > 80 or not REGISTRY_NAMESPACE_RE.match(value):
            raise ValueError(f"namespace {value!r} must be lowercase letters and digits joined by '_' or '-' (one "
                             "path part, at most 80 characters): what both Ollama and OCI registries accept")
        return value

    @model_validator(mode="after")
    def _check_insecure(self) -> Registry:
        if self.url.startswith("http://") and not self.insecure:
            raise ValueError("the registry URL is http://, which Ollama pulls only with insecure: true")
        if self.url.startswith("https://") and self.insecure:
            raise ValueError("insecure: true makes Ollama pull over plain http: with an https:// registry URL, "
                             "leave it false")
        return self

    @property
    def host(self) -> str:
        """host[:port], as it starts an Ollama model name."""
        return self.url.split("://", 1)[1]


class Distribution(Frozen):
    """How GGUFs reach the hosts: uploaded by the controller to every host (`push`, the default), or published
    once to an OCI registry that every host pulls from (`registry:`)."""

    registry: Registry | None = Field(default=None, description="Publish each tag once as an Ollama image; every "
                                      "host pulls it.")

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """`push`, or the mapping: what `_push` accepts."""
        return {"anyOf": [{"const": "push", "type": "string"}, handler(core_schema)],
                "description": cls.__doc__ and " ".join(cls.__doc__.split())}

    @model_validator(mode="before")
    @classmethod
    def _push(cls, value: Any) -> Any:
        if value == "push":
            return {}
        if isinstance(value, str):
            raise ValueError(f"expected 'push' or a mapping with registry:, got {value!r}")
        return value
