"""`convert`: a model directory to GGUF, with so8t.* provenance when it is a bake output."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .bake.bake import PROVENANCE_FILE
from .external.llamacpp import Converter, convert_to_gguf, locate_converter


def provenance_metadata(model_dir: Path) -> dict[str, str]:
    """so8t.* GGUF keys from a bake's so8t_bake.json, so a GGUF can be traced to its inputs."""
    path = model_dir / PROVENANCE_FILE
    if not path.is_file():
        return {"so8t.tool_version": __version__}
    bake = json.loads(path.read_text(encoding="utf-8"))
    adapters = [{"kind": a["kind"], "digest": a["digest"]} for a in bake.get("adapters", [])]
    return {
        "so8t.source_model": str(bake.get("source", "")),
        "so8t.adapters": json.dumps(adapters, sort_keys=True),
        "so8t.scales": json.dumps(bake.get("scales", {}), sort_keys=True),
        "so8t.tool_version": __version__,
    }


def convert_model_dir(model_dir: Path, out_file: Path, outtype: str) -> Converter:
    converter = locate_converter()
    convert_to_gguf(converter, model_dir, out_file, outtype, provenance_metadata(model_dir))
    return converter
