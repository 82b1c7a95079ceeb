"""Resolve a manifest's source model to a local directory (downloading hub ids when online)."""

from __future__ import annotations

from pathlib import Path

from .errors import BuildError, ModelError
from .manifest import Source

# What a bake and a conversion read; everything else in a hub repo is left behind.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.py"]


def resolve_source(source: Source, cache_root: Path) -> Path:
    if source.is_local:
        path = Path(source.model)
        if not path.is_dir():
            raise ModelError(f"{path}: source model directory not found")
        return path
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(source.model, revision=source.revision, cache_dir=cache_root / "hub",
                                  allow_patterns=HUB_PATTERNS)
    except Exception as e:  # the hub client raises many kinds; all mean "not available here"
        raise BuildError(f"source.model: cannot download {source.model!r} from the hub: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return Path(local)
