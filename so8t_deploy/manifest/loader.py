"""Read a manifest file: bounded, then YAML (strict_yaml), then ${VAR} interpolation, then schema validation.

Every failure becomes one ManifestError line of the form ``FILE: FIELD.PATH: problem``. None that comes from
the file's content is chained to the exception it came from: pydantic's and PyYAML's messages quote the input
(a header's value, the manifest's lines), and `-v` prints a chained exception in full.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import ValidationError

from ..errors import ManifestError
from ..jsonfile import read_bounded_text
from ..validation import describe, format_field_path
from .schema import Manifest
from .strict_yaml import YamlLimitError, load_yaml

MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: a manifest is a few kilobytes; more is a mistake or an attack
# ${VAR} or ${VAR:-default}; "$${" escapes a literal "${".
_VAR_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(value: Any, env: Mapping[str, str], loc: tuple[Any, ...] = ()) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a parsed YAML tree.

    A list or mapping met twice (what a YAML alias makes; the manifest's loader refuses them) is copied once and
    shared again, so the work is the size of the text, never the size of an alias expansion."""
    copies: dict[int, Any] = {}

    def walk(node: Any, where: tuple[Any, ...]) -> Any:
        if isinstance(node, str):
            return _substitute(node, env, where)
        if not isinstance(node, dict | list):
            return node
        if id(node) in copies:
            return copies[id(node)]
        copy: Any = {} if isinstance(node, dict) else []
        copies[id(node)] = copy  # before the children: a self-referencing tree ends here too
        if isinstance(node, dict):
            copy.update((k, walk(v, (*where, k))) for k, v in node.items())
        else:
            copy.extend(walk(v, (*where, i)) for i, v in enumerate(node))
        return copy

    return walk(value, loc)


def _substitute(text: str, env: Mapping[str, str], loc: tuple[Any, ...]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise _UnsetVariable(loc, name)

    return _VAR_RE.sub(substitute, text)


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


def parse_manifest(text: str, source: Path, env: Mapping[str, str] | None = None) -> Manifest:
    """Validate manifest text; ``source`` names the file in errors and anchors relative paths."""
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        kind = "" if isinstance(e, YamlLimitError) else "invalid YAML: "
        raise ManifestError(f"{source}{where}: {kind}{problem}") from None
    except RecursionError:  # the depth limit should stop it first; never a traceback either way
        raise ManifestError(f"{source}: invalid YAML: nested too deeply") from None
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
        # Not chained: pydantic's own message quotes each input, header values included. The other errors
        # follow on lines of their own, which only -v shows.
        others = "".join(f"\n  {describe(error, _keys_at)}" for error in errors[1:])
        raise ManifestError(f"{source}: {describe(errors[0], _keys_at)}{extra}{others}") from None


def read_manifest_text(path: Path) -> str:
    """The file's text, if it is a regular file of at most MAX_MANIFEST_BYTES of UTF-8."""
    return read_bounded_text(path, MAX_MANIFEST_BYTES, "manifest", ManifestError)


def load_manifest(path: str | Path, env: Mapping[str, str] | None = None) -> Manifest:
    path = Path(path)
    return parse_manifest(read_manifest_text(path), path, env)
