"""`demo init`: a complete, offline playground (tiny Phi-3, SO8T adapter, manifest)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .errors import UsageError

DEMO_HIDDEN_SIZE = 256
DEMO_LAYERS = 2

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


def init_demo(out_dir: Path) -> Path:
    """Write model/, adapters/so8t/ and manifest.yaml into out_dir, all or nothing."""
    from .tiny_models import write_random_so8t_adapter, write_tiny_model

    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"{out_dir}: directory is not empty; choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=out_dir.parent))
    try:
        write_tiny_model(staging / "model", "phi3", hidden_size=DEMO_HIDDEN_SIZE, num_layers=DEMO_LAYERS)
        write_random_so8t_adapter(staging / "adapters" / "so8t", DEMO_HIDDEN_SIZE, DEMO_LAYERS)
        (staging / "manifest.yaml").write_text(DEMO_MANIFEST, encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
