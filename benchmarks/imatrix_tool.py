"""Our importance matrix (llama-cpp-python's eval callback) against llama.cpp's own llama-imatrix tool.

The alternative to the runner is building llama-imatrix from the same pinned sdist. This measures that build
(once: the binary is cached under --cache-dir and reused), then runs the tool and compute_imatrix on the same
tiny f32 GGUF and text, at the same ctx and chunk count, one sequence per batch (-c = -b = -ub = ctx) as the
runner decodes. It prints the build time, both wall times and their ratio, whether the two files have the
same layout (keys, tensors, shapes, order), and per entry the largest relative difference of in_sum2 and of
counts: the runner sums in float64 where the tool sums in float32, so they should agree to float32 rounding.

    .venv/bin/python benchmarks/imatrix_tool.py [--hidden 256] [--layers 2] [--ctx 128] [--chunks 8]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
SDIST = REPO / ".cache" / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"]


def build_tool(sdist: Path, cache: Path, jobs: int) -> tuple[Path, float | None]:
    """llama-imatrix built from the sdist's vendored llama.cpp; the build's seconds, None when reused."""
    binary = cache / "build" / "bin" / "llama-imatrix"
    if binary.is_file():
        return binary, None
    started = time.perf_counter()
    source = cache / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        extract_llama_cpp(sdist, source)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(source), "-B", str(cache / "build"), *generator, *CMAKE_FLAGS],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(cache / "build"), "--target", "llama-imatrix", "-j", str(jobs)],
                   check=True, stdout=subprocess.DEVNULL)
    return binary, time.perf_counter() - started


def extract_llama_cpp(sdist: Path, dest: Path) -> None:
    """The sdist's vendor/llama.cpp, extracted beside dest and renamed into place."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.name != prefix]
        for member in members:
            member.name = member.name[len(prefix):]
        archive.extractall(Path(tmp) / "llama.cpp", members=members, filter="data")
        if not (Path(tmp) / "llama.cpp" / "CMakeLists.txt").is_file():
            raise SystemExit(f"{sdist}: no vendor/llama.cpp inside")
        shutil.rmtree(dest, ignore_errors=True)  # an earlier, interrupted extraction
        (Path(tmp) / "llama.cpp").rename(dest)


def prepare(workdir: Path, hidden: int, layers: int, words: int) -> tuple[Path, Path]:
    """A tiny Phi-3 as f32 GGUF and a calibration text of random words."""
    from so8t_deploy.external.llamacpp import convert_to_gguf, locate_converter
    from so8t_deploy.tiny_models import _WORDS, write_tiny_model

    gguf, text = workdir / f"phi3-{hidden}x{layers}-f32.gguf", workdir / "calibration.txt"
    if not gguf.is_file():
        model = write_tiny_model(workdir / f"phi3-{hidden}x{layers}", "phi3", hidden_size=hidden, num_layers=layers,
                                 num_heads=max(1, hidden // 64))
        convert_to_gguf(locate_converter(), model, gguf, "f32")
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(_WORDS) for _ in range(words)) + "\n")
    return gguf, text


def run_tool(binary: Path, gguf: Path, text: Path, out: Path, ctx: int, chunks: int, threads: int) -> float:
    command = [str(binary), "-m", str(gguf), "-f", str(text), "-o", str(out), "-c", str(ctx), "-b", str(ctx),
               "-ub", str(ctx), "--chunks", str(chunks), "--no-ppl", "-t", str(threads), "-ngl", "0"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"llama-imatrix failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}")
    return elapsed


def run_ours(gguf: Path, text: Path, out: Path, ctx: int, chunks: int, threads: int) -> float:
    from so8t_deploy.external.imatrix_compute import compute_imatrix

    started = time.perf_counter()
    # the dataset is the path the tool records (its -f), so the files' metadata can match too
    compute_imatrix(gguf, text, out, dataset=str(text), ctx=ctx, chunks=chunks, threads=threads)
    return time.perf_counter() - started


def layout(path: Path) -> tuple[list, list]:
    """Metadata (key, types, value) and tensor (name, shape, type) in file order."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = [(k, [int(t) for t in f.types], f.contents()) for k, f in reader.fields.items()]
    tensors = [(t.name, [int(n) for n in t.shape], int(t.tensor_type)) for t in reader.tensors]
    return fields, tensors


def compare(tool_file: Path, our_file: Path) -> None:
    from gguf import GGUFReader

    tool_layout, our_layout = layout(tool_file), layout(our_file)
    print(f"layout (metadata and tensor infos): {'identical' if tool_layout == our_layout else 'DIFFERENT'}")
    if tool_layout != our_layout:
        print(f"  tool: {tool_layout[0]} {tool_layout[1][:4]}\n  ours: {our_layout[0]} {our_layout[1][:4]}")
    tool = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in GGUFReader(tool_file).tensors}
    ours = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in GGUFReader(our_file).tensors}
    if tool.keys() != ours.keys():
        only_tool, only_ours = sorted(tool.keys() - ours.keys()), sorted(ours.keys() - tool.keys())
        print(f"entries differ: only the tool's {only_tool}, only ours {only_ours}")
    worst = {"in_sum2": 0.0, "counts": 0.0}
    print(f"{'entry':36} {'in_sum2 max rel':>16} {'counts max rel':>15}")
    for name in sorted(n.removesuffix(".in_sum2") for n in tool.keys() & ours.keys() if n.endswith(".in_sum2")):
        row = []
        for kind in worst:
            a, b = ours[f"{name}.{kind}"], tool[f"{name}.{kind}"]
            rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float32).tiny)))
            worst[kind] = max(worst[kind], rel)
            row.append(rel)
        print(f"{name:36} {row[0]:16.3e} {row[1]:15.3e}")
    print(f"max relative difference: in_sum2 {worst['in_sum2']:.3e}, counts {worst['counts']:.3e} "
          f"(float32 epsilon {np.finfo(np.float32).eps:.3e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for the tool's build")
    parser.add_argument("--sdist", type=Path, default=SDIST)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "imatrix-tool" / VERSION)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()

    binary, build_s = build_tool(args.sdist, args.cache_dir, args.jobs)
    print(f"llama-imatrix build: {'reused ' + str(binary) if build_s is None else f'{build_s:.1f} s'}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        gguf, text = prepare(workdir, args.hidden, args.layers, words=2 * args.ctx * args.chunks)
        tool_file, our_file = workdir / "tool.imatrix.gguf", workdir / "ours.imatrix.gguf"
        tool_s = run_tool(binary, gguf, text, tool_file, args.ctx, args.chunks, args.threads)
        ours_s = run_ours(gguf, text, our_file, args.ctx, args.chunks, args.threads)
        print(f"{args.chunks} chunks of {args.ctx} tokens, phi3 hidden {args.hidden} x {args.layers} layers, "
              f"{args.threads} threads")
        print(f"llama-imatrix: {tool_s:.2f} s   runner (compute_imatrix): {ours_s:.2f} s   "
              f"runner/tool: {ours_s / tool_s:.2f}")
        compare(tool_file, our_file)


if __name__ == "__main__":
    main()
