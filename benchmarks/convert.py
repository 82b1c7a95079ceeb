"""Orchestration overhead of `so8t-deploy build` against calling the tools directly.

Both paths do the same work on the same inputs, in one process (imports paid up front):
  direct: bake_model() -> llama.cpp's convert_hf_to_gguf.py -> llama_model_quantize per level,
          each GGUF fsynced (build publishes durable artifacts, so the baseline does too)
  build:  so8t_deploy.deploy.commands.build_manifest() on an empty workspace (its converter already
          extracted, as in any workspace after its first build): input hashing, cache keys, staging
          directories, markers, GGUF inspection and output digests included;
          then once more on the warm cache (the re-run).
Best of --repeat runs each. It prints wall times and the ratios: build/direct (target <= 1.05)
and rerun/build (target < 0.10).

    .venv/bin/python benchmarks/convert.py [--hidden 1024] [--layers 12] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from so8t_deploy.fsutil import fsync_path

LADDER = ["f16", "q8_0", "q4_k_m"]

MANIFEST = """\
apiVersion: so8t-deploy/v1
name: bench
source:
  model: {model}
  adapters:
    - {{kind: so8t, path: {adapter}}}
quantize: [{ladder}]
"""


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prepare(workdir: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    from so8t_deploy.tiny_models import write_random_so8t_adapter, write_tiny_model

    model, adapter = workdir / f"model-{hidden}x{layers}", workdir / f"adapter-{hidden}x{layers}"
    if not (model / "config.json").exists():
        write_tiny_model(model, "phi3", hidden_size=hidden, num_layers=layers, num_heads=hidden // 64)
        write_random_so8t_adapter(adapter, hidden, layers)
    return model, adapter


def direct(model: Path, adapter: Path, out: Path) -> None:
    import ctypes

    import llama_cpp

    from so8t_deploy.bake.bake import bake_model
    from so8t_deploy.external.llamacpp import locate_converter
    from so8t_deploy.manifest.quant_types import lookup_quant_type
    from so8t_deploy.manifest.schema import Scales
    from so8t_deploy.store.hashing import DigestCache

    # A fresh digest cache: the bake hashes its inputs, as the cold build does.
    bake_model(model, [(None, adapter)], out / "baked", Scales(), digests=DigestCache(out / "digests.json"))
    converter = locate_converter()
    command = [sys.executable, str(converter.script), str(out / "baked"), "--outfile", str(out / "f16.gguf"),
               "--outtype", "f16"]
    subprocess.run(command, check=True, capture_output=True)
    fsync_path(out / "f16.gguf")
    for quant in LADDER[1:]:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = lookup_quant_type(quant).ftype
        rc = llama_cpp.llama_model_quantize(str(out / "f16.gguf").encode(), str(out / f"{quant}.gguf").encode(),
                                            ctypes.byref(params))
        assert rc == 0, quant
        fsync_path(out / f"{quant}.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/so8t-bench-convert"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, adapter = prepare(args.workdir, args.hidden, args.layers)
    manifest_file = args.workdir / "bench.yaml"
    manifest_file.write_text(MANIFEST.format(model=model, adapter=adapter, ladder=", ".join(LADDER)))

    import llama_cpp  # noqa: F401 - imported before timing, like everything below

    from so8t_deploy.deploy.commands import build_manifest
    from so8t_deploy.external.llamacpp import locate_converter
    from so8t_deploy.manifest.loader import load_manifest
    from so8t_deploy.store.workspace import Workspace

    workspace = Workspace(args.workdir / "cache")
    locate_converter()  # extracted once for each path, before either is timed
    locate_converter(workspace.converter)

    def build(manifest, _cache) -> None:
        build_manifest(manifest, workspace)

    cache = workspace.objects
    results: dict[str, list[float]] = {"direct": [], "build": []}
    for _ in range(args.repeat):  # alternate, so neither path always runs on a colder page cache
        out = args.workdir / "direct"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        results["direct"].append(timed(lambda out=out: direct(model, adapter, out)))
        shutil.rmtree(cache, ignore_errors=True)
        workspace.digests_file.unlink(missing_ok=True)
        results["build"].append(timed(lambda: build(load_manifest(manifest_file), cache)))
    rerun = timed(lambda: build(load_manifest(manifest_file), cache))
    best = {name: min(times) for name, times in results.items()}
    summary = {
        "model": f"phi3 hidden {args.hidden}, {args.layers} layers, ladder {LADDER}",
        "direct_s": round(best["direct"], 2),
        "build_s": round(best["build"], 2),
        "rerun_s": round(rerun, 3),
        "build_over_direct": round(best["build"] / best["direct"], 3),
        "rerun_over_build": round(rerun / best["build"], 4),
    }
    print(json.dumps(summary, indent=2))
    print(f"orchestration overhead: {100 * (summary['build_over_direct'] - 1):+.1f}% (target <= +5%)")
    print(f"re-run: {100 * summary['rerun_over_build']:.1f}% of the first build (target < 10%)")


if __name__ == "__main__":
    main()
