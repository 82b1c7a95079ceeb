"""Does an adapter's declared base model name the model we are baking into?

Adapters record the model they were trained on (SO8T `base_model`, PEFT
`base_model_name_or_path`). Shapes catch a different architecture, but not a different
checkpoint of the same one (a base model and its instruct tune share every shape), so
a name that matches nothing is an error unless the manifest entry says
`allow_base_mismatch: true`: the explicit answer for a local copy saved under another name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterError
from ..external.hub import cached_repo_id


@dataclass(frozen=True)
class BaseIdentity:
    """The names a model directory is known by: its own, its config's, and a hub cache's repo id."""

    path: Path
    names: frozenset[str]

    @classmethod
    def of(cls, path: Path, config: dict[str, Any]) -> BaseIdentity:
        names = {path.name, str(config.get("_name_or_path") or ""), cached_repo_id(path) or ""}
        return cls(path, frozenset(name.rstrip("/") for name in names if name))

    def matches(self, declared: str) -> bool:
        """A hub id or path matches by its full value or its last component (a local copy keeps the name)."""
        wanted = declared.rstrip("/")
        return any(name == wanted or Path(name).name == Path(wanted).name for name in self.names)


def check_base_name(where: Path, key: str, declared: str | None, base: BaseIdentity, allow_mismatch: bool) -> bool:
    """Raise unless `declared` names the base or the mismatch is allowed; True when it was allowed."""
    if not declared or base.matches(declared):
        return False
    if allow_mismatch:
        return True
    known = ", ".join(repr(n) for n in sorted(base.names))
    raise AdapterError(
        f"{where}: {key} {declared!r} does not match the base model {str(base.path)!r} (known as {known}); "
        f"bake onto {declared!r}, or, if this directory holds that model under another name, "
        "set allow_base_mismatch: true on this adapter (bake --allow-base-mismatch)"
    )
