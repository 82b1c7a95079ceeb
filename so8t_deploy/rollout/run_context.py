"""What one command's run hands to every step it takes: the manifest it carries out, the workspace it
reads and writes, where it reports progress, and how it is cancelled."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cancel import CancelToken
from ..manifest.schema import Manifest
from ..progress import SILENT, Progress
from ..store.workspace import Workspace


@dataclass(frozen=True)
class RunContext:
    manifest: Manifest
    workspace: Workspace
    progress: Progress = SILENT
    cancel: CancelToken = field(default_factory=CancelToken)
