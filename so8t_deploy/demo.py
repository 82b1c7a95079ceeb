"""`demo init`: a complete, offline playground (tiny model, SO8T adapter, manifest).

The default model is a tiny Phi-3 with a SentencePiece tokenizer trained on the spot. `family` picks a tiny
model of a real chat family instead (tiny_models.FAMILIES: its real tokenizer and chat template, from the
pinned llama.cpp sdist), so the demo runs the same job on Qwen3, Gemma 2 or Llama 3.x.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .errors import SettingError, UsageError

DEMO_HIDDEN_SIZE = 256
DEMO_LAYERS = 2
FAMILY_HIDDEN_SIZE = 64  # a real family's vocabulary (up to 152k tokens) dominates: keep the rest small

DEMO_MANIFEST = """\
# Written by `so8t-deploy demo init`: everything here runs offline.
apiVersion: so8t-deploy/v1
name: so8t-demo
source:
  model: ./model
  adapters:
    - {kind: so8t, path: ./adapters/so8t}
bake:
  variants:
    full: {}
    light: {rotation: 0.1, ffn: 0.05, triality: 0.02}
quantize: [f16, q8_0]
modelfile:
  template: auto
  system: "You are a helpful assistant."
  parameters: {temperature: 0.7, num_ctx: 512}
targets:
  - name: local
    host: ${OLLAMA_HOST:-http://127.0.0.1:11434}
smoke:
  - {prompt: "Reply with the word hello.", expect: ".", timeout_s: 60}
"""


def init_demo(out_dir: Path, family: str | None = None) -> Path:
    """Write model/, adapters/so8t/ and manifest.yaml into out_dir, all or nothing."""
    from .tiny_models import FAMILIES, write_random_so8t_adapter, write_tiny_model

    if family is not None and family not in FAMILIES:
        raise SettingError("family", f"unknown family {family!r} (choose from {', '.join(FAMILIES)})")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"{out_dir}: directory is not empty; choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=out_dir.parent))
    try:
        if family is None:
            hidden = DEMO_HIDDEN_SIZE
            write_tiny_model(staging / "model", "phi3", hidden_size=hidden, num_layers=DEMO_LAYERS)
        else:
            hidden = FAMILY_HIDDEN_SIZE
            _write_family_demo_model(staging / "model", family)
        write_random_so8t_adapter(staging / "adapters" / "so8t", hidden, DEMO_LAYERS,
                                  final=_final_site_folds(staging / "model"))
        (staging / "manifest.yaml").write_text(DEMO_MANIFEST, encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _write_family_demo_model(model_dir: Path, family: str) -> None:
    from .tiny_models import write_family_model

    try:
        write_family_model(model_dir, family, hidden_size=FAMILY_HIDDEN_SIZE, num_layers=DEMO_LAYERS)
    except ValueError as exc:  # a family whose chat template the pinned sdist lacks (Gemma 3)
        raise SettingError("family", f"{family}: {exc}") from None


def _final_site_folds(model_dir: Path) -> bool:
    """Whether the bake takes an SO8T `final` site on this model (not on Gemma 2: see the v1.1 spec)."""
    import json

    from .bake.layout import HEAD_IS_EMBEDDING_TYPES

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return config.get("model_type") not in HEAD_IS_EMBEDDING_TYPES
