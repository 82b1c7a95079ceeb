"""Provenance of a GGUF: the so8t.* keys every GGUF carries (an input's digest is in store/provenance.py).

The GGUF keys let a GGUF be traced to its
inputs, and three of them (`so8t.bake_key`, `so8t.llama_cpp`, with `general.file_type`) identify
its bytes: a host's copy is recognised from /api/show alone, without any local record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__
from ..external.llamacpp import KV_VALUE_MAX, LLAMA_CPP_PYTHON_VERSION
from ..store.provenance import PROVENANCE_FILE

IMATRIX_KEY = "so8t.imatrix_key"  # the importance matrix a GGUF was quantized with: part of its identity
CALIBRATION_KEY = "so8t.calibration"  # sha256 of the calibration text, as used


def llama_cpp_label() -> str:
    """The pinned llama.cpp, as cache keys and GGUFs name it (a checkout set by SO8T_LLAMA_CPP_DIR differs)."""
    override = os.environ.get("SO8T_LLAMA_CPP_DIR")
    return f"llama.cpp at {override}" if override else f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"


def gguf_metadata(*, source: str, adapters: list[dict[str, str]], scales: dict[str, float], variant: str,
                  manifest_name: str, bake_key: str) -> dict[str, str]:
    """The so8t.* keys of a GGUF built from a manifest; `adapters` is [{kind, digest}] in fold order."""
    return {
        "so8t.source_model": source,
        "so8t.adapters": json.dumps(adapters, sort_keys=True),
        "so8t.scales": json.dumps(scales, sort_keys=True),
        "so8t.variant": variant,
        "so8t.manifest_name": manifest_name,
        "so8t.tool_version": __version__,
        "so8t.bake_key": bake_key,
        "so8t.llama_cpp": llama_cpp_label(),
    }


def quantize_imatrix_keys(*, file: str, datasets: list[str] | tuple[str, ...], entries: int,
                         chunks: int) -> dict[str, str | int]:
    """The `quantize.imatrix.*` keys llama-quantize writes into what it quantizes with an importance matrix
    (strings cut to its 127 bytes)."""
    keys: dict[str, str | int] = {"quantize.imatrix.file": _override_text(file)}
    if datasets:
        keys["quantize.imatrix.dataset"] = _override_text(datasets[0])  # llama-quantize records the first
    keys["quantize.imatrix.entries_count"] = entries
    if chunks > 0:
        keys["quantize.imatrix.chunks_count"] = chunks
    return keys


def imatrix_metadata(*, file: str, datasets: list[str], entries: int, chunks: int, calibration: str,
                     imatrix_key: str) -> dict[str, str | int]:
    """What a GGUF built with the manifest's importance matrix records: llama-quantize's keys, with the file by
    its name (not a path, so the bytes do not depend on the machine), and the so8t.* provenance."""
    return quantize_imatrix_keys(file=file, datasets=datasets, entries=entries, chunks=chunks) | \
        {CALIBRATION_KEY: calibration, IMATRIX_KEY: imatrix_key}


def _override_text(text: str) -> str:
    """What llama-quantize's strncpy(val_str, text, 127) keeps of a string, cut at a character boundary."""
    return text.encode("utf-8")[:KV_VALUE_MAX].decode("utf-8", errors="ignore")


def bake_output_metadata(model_dir: Path) -> dict[str, str]:
    """so8t.* keys for `so8t-deploy convert` of a directory: from its so8t_bake.json when it is a bake output."""
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
