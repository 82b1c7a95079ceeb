"""What this workspace verified on each host: a local cache that saves /api/show calls, never the truth.

For each tag: the spec we sent (a digest of GGUF, template, system and parameters) and the host's
manifest digest once the tag was smoke-tested and promoted. A tag whose host digest is still that
one is the same model, so plan need not ask /api/show again. Nothing about verification *state*
lives here: a candidate or a promotion that a run left unfinished is visible on the host itself
(its `-candidate` and `-rollback` tags), so a fresh workspace decides exactly as this one would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..fsutil import write_atomic


@dataclass(frozen=True)
class TagRecord:
    spec: str | None  # DesiredModel.spec_digest of what was sent
    manifest: str | None  # the host's manifest digest once verified


class HostRecords:
    """One JSON file per host URL under `state_dir`; every save is atomic and fsynced."""

    def __init__(self, state_dir: Path, url: str):
        self.path = state_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
        self.entries: dict[str, TagRecord] = {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = {tag: TagRecord(spec=entry["spec"], manifest=entry["manifest"])
                            for tag, entry in raw.items() if entry.get("verified", True)}
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            pass  # no journal, or one from another version: it is a cache, start without it

    def verified_as(self, tag: str, spec: str | None, manifest_digest: str | None) -> bool:
        """True when we verified exactly this spec on this tag, and the host still holds that manifest."""
        entry = self.entries.get(tag)
        return bool(entry and manifest_digest and spec and entry.manifest == manifest_digest and entry.spec == spec)

    def put(self, tag: str, record: TagRecord) -> None:
        self.entries[tag] = record
        self.save()

    def save(self) -> None:
        entries = {tag: asdict(entry) for tag, entry in self.entries.items()}
        write_atomic(self.path, json.dumps(entries, indent=2, sort_keys=True))
