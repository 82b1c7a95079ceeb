"""Read a manifest file: YAML, then ${VAR} interpolation, then schema validation.

Every failure becomes one ManifestError line of the form ``FILE: FIELD.PATH: problem``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from ..errors import ManifestError
from .schema import Manifest

# ${VAR} or ${VAR:-default}; "$${" escapes a literal "${".
_VAR_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def format_field_path(loc: tuple[Any, ...]) -> str:
    """('targets', 1, 'host') -> 'targets[1].host'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def interpolate_env(value: Any, env: Mapping[str, str], loc: tuple[Any, ...] = ()) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate_env(v, env, (*loc, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v, env, (*loc, i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise _UnsetVariable(loc, name)

    return _VAR_RE.sub(substitute, value)


class _UnsetVariable(Exception):
    def __init__(self, loc: tuple[Any, ...], name: str):
        super().__init__(name)
        self.loc, self.name = loc, name


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows in the mapping that holds `loc`'s last part (by alias where one is set)."""
    annotation: Any = Manifest
    for part in loc[:-1]:
        if get_origin(annotation) in (list, dict):  # an index or a free key (a variant's name): its value's type
            annotation = get_args(annotation)[-1]
            continue
        model = _model_of(annotation)
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return []
        annotation = field.annotation
    model = _model_of(annotation)
    return [f.alias or name for name, f in model.model_fields.items()] if model is not None else []


def _model_of(annotation: Any) -> Any:
    """The pydantic model an annotation names, directly or as one member of a union."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    if get_origin(annotation) in (list, dict):
        return None
    return next((m for arg in get_args(annotation) if (m := _model_of(arg)) is not None), None)


def _describe_validation_error(error: ErrorDetails) -> str:
    loc = format_field_path(tuple(error["loc"]))
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        message = "unknown key"
        close = difflib.get_close_matches(str(error["loc"][-1]), _keys_at(tuple(error["loc"])), n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
    elif kind == "missing":
        message = "required key is missing"
    elif kind in ("literal_error", "enum"):
        message = f"{message}, got {error.get('input')!r}"
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return f"{loc}: {message}" if loc else message


def parse_manifest(text: str, source: Path, env: Mapping[str, str] | None = None) -> Manifest:
    """Validate manifest text; ``source`` names the file in errors and anchors relative paths."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError(f"{source}{where}: invalid YAML: {problem}") from e
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: the manifest must be a YAML mapping")
    try:
        raw = interpolate_env(raw, os.environ if env is None else env)
    except _UnsetVariable as e:
        raise ManifestError(
            f"{source}: {format_field_path(e.loc)}: environment variable {e.name!r} is not set "
            "and has no default (use ${VAR:-default})"
        ) from None
    try:
        return Manifest.model_validate(raw, context={"base_dir": source.resolve().parent})
    except ValidationError as e:
        # A typo ('quantise:') also makes the key it meant missing: report the unknown key first.
        errors = sorted(e.errors(), key=lambda error: error["type"] != "extra_forbidden")
        extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ManifestError(f"{source}: {_describe_validation_error(errors[0])}{extra}") from e


def load_manifest(path: str | Path, env: Mapping[str, str] | None = None) -> Manifest:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ManifestError(f"{path}: cannot read manifest: {reason}") from e
    return parse_manifest(text, path, env)
