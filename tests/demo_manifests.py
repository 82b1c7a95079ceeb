"""Manifests for the demo model (tests' `built_demo`), pointed at test hosts, with the options tests vary."""

from __future__ import annotations

import json
from pathlib import Path

DEMO_TAGS = ["so8t-demo:full-f16", "so8t-demo:full-q8_0", "so8t-demo:light-f16", "so8t-demo:light-q8_0"]


def write_demo_manifest(path: Path, demo_dir: Path, urls: list[str], *, system: str = "You are a helpful assistant.",
                        expect: str = ".", prune: bool = False, on_failure: str = "rollback", canary: int = 1,
                        host_timeout: float = 30, smoke_extra: str | None = "", source: str | None = None,
                        parallelism: int = 2,
                        variants: str = "{full: {}, light: {rotation: 0.1, ffn: 0.05, triality: 0.02}}",
                        extra: str = "") -> Path:
    """`smoke_extra=None` declares no smoke test at all."""
    test = f'{{prompt: "Reply with the word hello.", expect: {json.dumps(expect)}, timeout_s: 60{smoke_extra}}}'
    smoke = "smoke: []" if smoke_extra is None else f"smoke:\n  - {test}"
    policy = (f"canary: {min(canary, max(len(urls), 1))}, parallelism: {parallelism}, on_failure: {on_failure}, "
              f"prune: {str(prune).lower()}")
    targets = "\n".join(f"  - {{name: host-{i}, host: '{url}', timeout_s: {host_timeout}}}"
                        for i, url in enumerate(urls)) or "  []"
    path.write_text(f"""\
apiVersion: so8t-deploy/v1
name: so8t-demo
source:
  model: {source or demo_dir / 'model'}
  adapters: [{{kind: so8t, path: {demo_dir / 'adapters' / 'so8t'}}}]
bake:
  variants: {variants}
quantize: [f16, q8_0]
modelfile:
  system: {json.dumps(system)}
  parameters: {{num_ctx: 512}}
targets:
{targets}
rollout:
  {{{policy}}}
{smoke}
{extra}""")
    return path
