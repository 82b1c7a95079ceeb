"""What this tool did on each host: a local journal, written before and after every change.

For each tag: the spec we sent (a digest of GGUF, template, system and parameters), the host's
manifest digest once the tag was verified, and whether it was verified at all. An entry is
written as unverified *before* a create and becomes verified only after the smoke tests pass,
so a run that dies in between leaves a trace the next run acts on: it smoke-tests that tag or
rolls it back, and never counts it as unchanged. The journal is a hint for speed and safety,
never the truth about a host: that is always re-observed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..fsutil import write_atomic


@dataclass(frozen=True)
class TagRecord:
    spec: str | None  # DesiredModel.spec_digest of what was sent (None: a tag verified, not built, here)
    manifest: str | None  # the host's manifest digest once verified
    verified: bool
    existed_before: bool = True  # False: the run that wrote this created the tag (a rollback deletes it)


class HostRecords:
    """One JSON file per host URL under `state_dir`; every save is atomic and fsynced."""

    def __init__(self, state_dir: Path, url: str):
        self.path = state_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
        self.entries: dict[str, TagRecord] = {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = {tag: TagRecord(**entry) for tag, entry in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # no journal, or one from another version: it is a hint, start without it

    def verified_as(self, tag: str, spec: str | None, manifest_digest: str | None) -> bool:
        """True when we verified exactly this spec on this tag, and the host still holds that manifest."""
        entry = self.entries.get(tag)
        return bool(entry and entry.verified and manifest_digest and spec and entry.manifest == manifest_digest
                    and entry.spec == spec)

    def unverified(self, tag: str) -> TagRecord | None:
        entry = self.entries.get(tag)
        return entry if entry is not None and not entry.verified else None

    def put(self, tag: str, record: TagRecord | None) -> None:
        if record is None:
            self.entries.pop(tag, None)
        else:
            self.entries[tag] = record
        self.save()

    def save(self) -> None:
        entries = {tag: asdict(entry) for tag, entry in self.entries.items()}
        write_atomic(self.path, json.dumps(entries, indent=2, sort_keys=True))
