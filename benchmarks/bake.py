"""Benchmark the streaming bake against its floor (a plain copy) and its alternative (load, fold, save).

    .venv/bin/python benchmarks/bake.py [--layers N] [--workdir DIR] [--keep] [--verify] [--json] [--device D]

A random bf16 checkpoint with Phi-3.5-mini's real shapes (2 safetensors shards, ~7.6 GB at
32 layers) and a full SO8T adapter (every site, every layer, all three triality reps, final)
are synthesized once and cached in the work directory. Each step then produces a complete
model directory from it, in its own child process so that its peak RSS is its own:

    cp         copy the model directory file by file (`shutil.copyfile`, through the page cache): the
               IO floor the targets are set against
    cp-direct  the same copy written with O_DIRECT, past the page cache, as the bake writes: the
               disk's own floor, which on these VMs is often well below cp's (a fresh page-cache
               page costs them 0.6-2.5 CPU-seconds per GB)
    bake       so8t_deploy's streaming bake (what `so8t-deploy bake` runs) with an empty digest
               cache, so it also takes the BLAKE3 of every input for its provenance file
    bake-warm  the same with the inputs' digests already known (the second variant of a
               base model, or a re-bake): the common case in `build`
    naive      the research-script path: from_pretrained, fold every parameter in place with
               the project's own planner (identical math), save_pretrained

cp, cp-direct, bake and bake-warm run --repeat times (default 2), in rounds of one run each, and
report their best run: the page-cache copy on these VMs varies 5x from run to run.

Every step fsyncs what it writes, as the bake does, so all of them pay for the same durable
write. A warm-up read puts the checkpoint in the page cache first, so all of them read from
memory equally; each step's output is deleted (or evicted from the cache, when kept) before
the next so it does not crowd the checkpoint out. Wall time is the step's work alone:
interpreter start-up and imports happen before the clock starts. Peak RSS is the child's
high-water mark (VmHWM), which counts file pages mapped into the process as well as its own
memory. Not ru_maxrss: Linux carries the parent's peak across fork and exec into the child's
ru_maxrss, so a child of this (multi-GiB) parent would report the parent's peak.

Each bake step also reports where its time went, phase by phase (read, hash, check, fold, cast,
write, fsync): the CPU seconds of the threads that ran the phase and their wall seconds (see
so8t_deploy/bake/phases.py). `--device cuda` folds on a GPU (the bake's SO8T_BAKE_DEVICE).

Targets: the bake within 1.5x of cp, at least 3x faster than naive, under 2 GiB peak RSS.
The two bake steps are each held to the cp target, and to the same 1.5x of cp-direct.
Missing one is reported (MISS), not an error: the exit status is 0 unless a step fails.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from so8t_deploy.fsutil import fsync_tree

# Phi-3.5-mini-instruct's shapes.
HIDDEN = 3072
INTERMEDIATE = 8192
VOCAB = 32064
HEADS = 32
KV_HEADS = 32
FULL_LAYERS = 32
INIT_STD = 0.02  # the Phi-3 config's initializer_range

SHARD_FILES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX_FILE = "model.safetensors.index.json"
# Bump when the synthesized checkpoint changes, so cached ones are regenerated.
CHECKPOINT_VERSION = 1

STEPS = ("cp", "cp-direct", "bake", "bake-warm", "naive")
# Modules each step imports before its clock starts (transformers loads model classes lazily).
STEP_IMPORTS = {
    "cp": (),
    "cp-direct": (),
    "bake": ("so8t_deploy.bake.bake",),
    "bake-warm": ("so8t_deploy.bake.bake",),
    "naive": ("so8t_deploy.bake.bake", "transformers", "transformers.models.phi3.modeling_phi3"),
}
GB = 1e9
GIB_IN_KIB = 2**20


def log(message: str) -> None:
    # Progress goes to stderr so that --json leaves stdout machine-readable.
    print(message, file=sys.stderr, flush=True)


# --- the synthesized checkpoint -------------------------------------------------------------


def _layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{layer}"
    qkv_rows = (HEADS + 2 * KV_HEADS) * (HIDDEN // HEADS)
    return {
        f"{p}.self_attn.qkv_proj.weight": (qkv_rows, HIDDEN),
        f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        f"{p}.mlp.gate_up_proj.weight": (2 * INTERMEDIATE, HIDDEN),
        f"{p}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        f"{p}.input_layernorm.weight": (HIDDEN,),
        f"{p}.post_attention_layernorm.weight": (HIDDEN,),
    }


def shard_shapes(layers: int) -> list[dict[str, tuple[int, ...]]]:
    """Tensor shapes per shard: embeddings and the first half of the layers, then the rest and the head."""
    half = (layers + 1) // 2
    first: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    second: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        (first if layer < half else second).update(_layer_shapes(layer))
    second["model.norm.weight"] = (HIDDEN,)
    second["lm_head.weight"] = (VOCAB, HIDDEN)
    return [first, second]


def phi3_config(layers: int) -> dict:
    """Phi-3-mini's config.json (4k context, no rope scaling) with the requested depth."""
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "pad_token_id": 32000,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "initializer_range": INIT_STD,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": 2047,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",  # transformers 4 reads this key, transformers 5 the next
        "dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def _random_tensor(shape: tuple[int, ...]):
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)  # RMSNorm weights sit near 1
    return torch.randn(shape).mul_(INIT_STD).to(torch.bfloat16)


def synthesize_checkpoint(model_dir: Path, layers: int) -> None:
    """Write the checkpoint one shard at a time, so at most one shard (~3.8 GB) is in memory."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model_dir.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total_size = 0
    for file_name, shapes in zip(SHARD_FILES, shard_shapes(layers), strict=True):
        log(f"  writing {file_name} ({len(shapes)} tensors)")
        tensors = {name: _random_tensor(shape) for name, shape in shapes.items()}
        save_file(tensors, str(model_dir / file_name), metadata={"format": "pt"})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(model_dir / INDEX_FILE, index)
    _write_json(model_dir / "config.json", phi3_config(layers))
    # Flush now: writeback of the fresh shards must not overlap (and slow down) a timed step.
    fsync_tree(model_dir)


def ensure_checkpoint(workdir: Path, layers: int) -> Path:
    """The cached checkpoint for this depth, synthesized first if missing or stale."""
    model_dir = workdir / f"phi3-{layers}L"
    # The marker sits beside the model, not in it: the bake copies every file of a model directory.
    marker = workdir / f"phi3-{layers}L.ready.json"
    spec = {"version": CHECKPOINT_VERSION, "layers": layers}
    if model_dir.is_dir() and marker.is_file() and json.loads(marker.read_text()) == spec:
        log(f"reusing the checkpoint in {model_dir}")
        return model_dir
    marker.unlink(missing_ok=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    log(f"synthesizing a {layers}-layer bf16 Phi-3 checkpoint in {model_dir}")
    started = time.perf_counter()
    synthesize_checkpoint(model_dir, layers)
    _write_json(marker, spec)  # written last: a half-written checkpoint is never reused
    log(f"  done in {time.perf_counter() - started:.0f} s")
    return model_dir


def write_adapter(workdir: Path, layers: int, kind: str = "so8t") -> Path:
    adapter_dir = workdir / f"{kind}-{layers}L"
    shutil.rmtree(adapter_dir, ignore_errors=True)  # a few MB and seeded: cheaper to rewrite than to check
    if kind == "lora":
        return write_lora_adapter(adapter_dir, layers)
    from so8t_deploy.tiny_models import write_random_so8t_adapter

    return write_random_so8t_adapter(adapter_dir, hidden_size=HIDDEN, num_layers=layers)


LORA_RANK = 16


def write_lora_adapter(adapter_dir: Path, layers: int) -> Path:
    """A plain PEFT LoRA (rank 16, every projection of every layer), in PEFT's file layout."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for name, shape in _layer_shapes(layer).items():
            if len(shape) != 2:
                continue
            prefix = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(LORA_RANK, shape[1], generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(shape[0], LORA_RANK, generator=generator) * 0.01
    adapter_dir.mkdir(parents=True)
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": LORA_RANK, "lora_alpha": 32, "bias": "none",
              "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
    _write_json(adapter_dir / "adapter_config.json", config)
    return adapter_dir


# --- file helpers ---------------------------------------------------------------------------


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def evict_from_page_cache(root: Path) -> None:
    """Drop a kept output's (clean, fsynced) pages, so it cannot crowd the checkpoint out of memory."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --- the steps (each runs in a child process) -----------------------------------------------


def step_cp(model_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, dict[str, float]] | None:
    # shutil.copyfile copies inside the kernel on Linux, the cheapest way to duplicate the bytes.
    out_dir.mkdir()
    for source in sorted(model_dir.iterdir()):
        shutil.copyfile(source, out_dir / source.name)
    fsync_tree(out_dir)
    return None


DIRECT_CHUNK = 32 << 20  # a multiple of any logical block size


def step_cp_direct(model_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, dict[str, float]] | None:
    """Read each file into one page-aligned buffer and write it with O_DIRECT (the last, partial block
    without it, as dd does), one chunk after the other."""
    out_dir.mkdir()
    buffer = mmap.mmap(-1, DIRECT_CHUNK)
    for source in sorted(model_dir.iterdir()):
        target = os.open(out_dir / source.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            with open(source, "rb", buffering=0) as reader:
                while n := reader.readinto(buffer):
                    if n % 4096:
                        fcntl.fcntl(target, fcntl.F_SETFL, fcntl.fcntl(target, fcntl.F_GETFL) & ~os.O_DIRECT)
                    with memoryview(buffer)[:n] as chunk:
                        written = 0
                        while written < n:
                            written += os.write(target, chunk[written:])
            os.fsync(target)
        finally:
            os.close(target)
    fsync_tree(out_dir)
    return None


def step_bake(model_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, dict[str, float]] | None:
    from so8t_deploy.bake.bake import bake_model
    from so8t_deploy.manifest.schema import Scales

    return bake_model(model_dir, [(None, adapter_dir)], out_dir, Scales()).phases


def step_naive(model_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, dict[str, float]] | None:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    fold_in_place(model, model_dir, adapter_dir)
    model.save_pretrained(out_dir)
    fsync_tree(out_dir)
    return None


def fold_in_place(model, model_dir: Path, adapter_dir: Path) -> None:
    """Apply the bake's own plan to the loaded parameters, so both paths do the same arithmetic."""
    from so8t_deploy.bake.adapters import load_adapters
    from so8t_deploy.bake.edits import apply_edits
    from so8t_deploy.bake.layout import layout_from_config
    from so8t_deploy.bake.model_dir import open_model_dir
    from so8t_deploy.bake.planners import plan_bake
    from so8t_deploy.manifest.schema import Scales

    md = open_model_dir(model_dir)
    layout = layout_from_config(md.config, "config.json")
    adapters = load_adapters([(None, adapter_dir)], md)
    shapes = {name: entry.shape for shard in md.shards for name, entry in shard.tensors.items()}
    plan = plan_bake(layout, shapes, adapters, Scales())
    params = dict(model.named_parameters())
    for name, edits in plan.edits.items():
        p = params[name]
        p.data.copy_(apply_edits(p.data.float(), edits).to(p.dtype))


STEP_FUNCTIONS: dict[str, Callable[[Path, Path, Path], dict[str, dict[str, float]] | None]] = {
    "cp": step_cp, "cp-direct": step_cp_direct, "bake": step_bake, "bake-warm": step_bake, "naive": step_naive,
}


def run_step_here(name: str, model_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """Child side: import, time the step, print one JSON line with wall time and peak RSS."""
    for module in STEP_IMPORTS[name]:
        importlib.import_module(module)
    started, cpu_before = time.perf_counter(), _cpu_seconds()
    phases = STEP_FUNCTIONS[name](model_dir, adapter_dir, out_dir)
    wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
    print(json.dumps({"step": name, "wall_s": wall, "cpu_s": cpu, "peak_rss_kib": peak_rss_kib(), "phases": phases}),
          flush=True)


def _cpu_seconds() -> float:
    """User + system seconds of this process so far, every thread (the kernel's copies included)."""
    times = os.times()
    return times.user + times.system


def peak_rss_kib() -> int:
    """This process's own peak RSS: VmHWM belongs to the address space, which exec makes new."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])  # "VmHWM:  123456 kB"
    raise RuntimeError("/proc/self/status has no VmHWM (the benchmark needs Linux)")


# --- the parent: run the steps, compare, report ---------------------------------------------


@dataclass
class StepResult:
    step: str
    wall_s: float | None = None
    peak_rss_gib: float | None = None
    gb_written: float | None = None
    cpu_s: float | None = None  # user + system time of the step, every thread
    phases: dict[str, dict[str, float]] | None = None  # the bake's CPU and wall seconds per phase
    error: str | None = None


def run_step_in_child(name: str, model_dir: Path, adapter_dir: Path, out_dir: Path,
                      env: dict[str, str] | None = None) -> StepResult:
    shutil.rmtree(out_dir, ignore_errors=True)  # left over from a --keep or an interrupted run
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--model-dir", str(model_dir),
               "--adapter-dir", str(adapter_dir), "--out-dir", str(out_dir)]
    log(f"step {name}: running")
    # The child's stderr (tracebacks, library warnings) goes straight to ours.
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False, env={**os.environ, **(env or {})})
    lines = child.stdout.strip().splitlines()
    for line in lines[:-1]:
        log(f"  [{name}] {line}")  # anything a library printed to stdout
    if child.returncode != 0 or not lines:
        return StepResult(name, error=f"exit status {child.returncode}")
    measured = json.loads(lines[-1])
    result = StepResult(name, wall_s=measured["wall_s"], peak_rss_gib=measured["peak_rss_kib"] / GIB_IN_KIB,
                        gb_written=tree_bytes(out_dir) / GB, cpu_s=measured["cpu_s"], phases=measured["phases"])
    log(f"step {name}: {result.wall_s:.1f} s, peak RSS {result.peak_rss_gib:.2f} GiB")
    return result


def compare_outputs(baked: Path, naive: Path) -> dict:
    """Tensor-by-tensor comparison of the bake's output with the naive path's: they should be identical."""
    import torch
    from safetensors import safe_open

    from so8t_deploy.bake.model_dir import open_model_dir

    a, b = open_model_dir(baked), open_model_dir(naive)
    missing = sorted(a.tensor_names ^ b.tensor_names)
    identical, differing, max_abs_diff = 0, [], 0.0
    for shard in a.shards:
        with safe_open(shard.path, framework="pt") as reader:
            for name in sorted(shard.tensors):
                located = b.locate(name)
                if located is None:
                    continue
                with safe_open(located[0].path, framework="pt") as other:
                    x, y = reader.get_tensor(name), other.get_tensor(name)
                if torch.equal(x, y):
                    identical += 1
                    continue
                differing.append(name)
                if x.shape == y.shape:
                    max_abs_diff = max(max_abs_diff, (x.float() - y.float()).abs().max().item())
    return {"identical": identical, "differing": differing, "missing": missing, "max_abs_diff": max_abs_diff}


def source_revision() -> str:
    """The project commit being measured, flagged when the package has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = _git(root, "rev-parse", "--short", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--", "so8t_deploy")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} + uncommitted changes" if dirty else commit


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def warm_page_cache(model_dir: Path) -> None:
    subprocess.run(["cat", *sorted(str(p) for p in model_dir.iterdir())], stdout=subprocess.DEVNULL, check=True)


def run_benchmark(args: argparse.Namespace) -> dict:
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_checkpoint(workdir, args.layers)
    adapter_dir = write_adapter(workdir, args.layers, args.adapter)
    log("warming the page cache")
    warm_page_cache(model_dir)

    outputs = {step: workdir / "out" / step for step in STEPS}
    # --verify compares the bake's output with the naive one's after both have run.
    keep = set(STEPS) if args.keep else {"bake", "naive"} if args.verify else set()
    digests = workdir / "digests"  # the bake's SO8T_CACHE_DIR: empty for "bake", filled for "bake-warm"
    # Rounds of cp, bake and bake-warm, one run of each per round: a slow spell of this VM's disk or
    # memory then costs every step a run, instead of all the runs of one step. naive runs once, last.
    runs: dict[str, list[StepResult]] = {step: [] for step in args.steps}
    rounds = [[step for step in args.steps if step != "naive"]] * args.repeat + [["naive"] * ("naive" in args.steps)]
    for steps in rounds:
        for step in steps:
            if step == "bake":
                shutil.rmtree(digests, ignore_errors=True)
            env = {"SO8T_CACHE_DIR": str(digests), "SO8T_BAKE_DEVICE": args.device} if step.startswith("bake") else None
            runs[step].append(run_step_in_child(step, model_dir, adapter_dir, outputs[step], env))
            if step in keep:
                evict_from_page_cache(outputs[step])
            else:
                shutil.rmtree(outputs[step], ignore_errors=True)
    results = {step: min(step_runs, key=lambda r: float("inf") if r.wall_s is None else r.wall_s)
               for step, step_runs in runs.items()}

    verification = None
    if args.verify and {"bake", "naive"} <= results.keys() and not (results["bake"].error or results["naive"].error):
        log("comparing the bake's output with the naive path's")
        verification = compare_outputs(outputs["bake"], outputs["naive"])
    if not args.keep:
        for step in keep:
            shutil.rmtree(outputs[step], ignore_errors=True)

    return {
        "revision": source_revision(),
        "checkpoint": {"path": str(model_dir), "layers": args.layers, "gb": tree_bytes(model_dir) / GB},
        "device": args.device,
        "steps": results,
        "targets": targets(results),
        "verify": verification,
    }


# --- targets and the report -----------------------------------------------------------------


@dataclass
class Target:
    label: str
    value: float | None
    limit: float
    at_most: bool  # the value must be <= limit (else >= limit)
    unit: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        met = self.value <= self.limit if self.at_most else self.value >= self.limit
        return "PASS" if met else "MISS"


def _ratio(numerator: StepResult, denominator: StepResult) -> float | None:
    if numerator.wall_s is None or not denominator.wall_s:
        return None
    return numerator.wall_s / denominator.wall_s


def targets(measured: dict[str, StepResult]) -> list[Target]:
    results = {step: measured.get(step, StepResult(step)) for step in STEPS}  # a step not run: n/a
    return [
        Target("bake / cp", _ratio(results["bake"], results["cp"]), 1.5, at_most=True, unit="x"),
        Target("bake-warm / cp", _ratio(results["bake-warm"], results["cp"]), 1.5, at_most=True, unit="x"),
        Target("bake / cp-direct", _ratio(results["bake"], results["cp-direct"]), 1.5, at_most=True, unit="x"),
        Target("bake-warm / cp-direct", _ratio(results["bake-warm"], results["cp-direct"]), 1.5, at_most=True,
               unit="x"),
        Target("naive / bake", _ratio(results["naive"], results["bake"]), 3.0, at_most=False, unit="x"),
        Target("bake peak RSS", results["bake"].peak_rss_gib, 2.0, at_most=True, unit=" GiB"),
    ]


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_phases(steps: dict[str, StepResult]) -> None:
    """Where each bake's time went: per phase, the CPU seconds of the threads that ran it and their wall
    seconds. Phases overlap on several threads, so wall seconds add up to more than the step's wall time;
    where wall exceeds CPU, a thread waited (a write held back by the disk, an fsync, no free core)."""
    baked = {name: result.phases for name, result in steps.items() if result.phases}
    if not baked:
        return
    print(f"{'phase':<10}" + "".join(f"{name + ' CPU s':>16}{'wall s':>8}" for name in baked))
    for phase in next(iter(baked.values())):
        print(f"{phase:<10}" + "".join(f"{times[phase]['cpu_s']:>16.2f}{times[phase]['wall_s']:>8.2f}"
                                       for times in baked.values()))
    print(f"{'sum':<10}" + "".join(f"{sum(t['cpu_s'] for t in times.values()):>16.2f}"
                                   f"{sum(t['wall_s'] for t in times.values()):>8.2f}" for times in baked.values()))
    print()


def print_report(report: dict) -> None:
    checkpoint = report["checkpoint"]
    print(f"so8t_deploy: {report['revision']}")
    print(f"checkpoint: {checkpoint['layers']} layers, bf16, {checkpoint['gb']:.2f} GB in 2 shards "
          f"({checkpoint['path']}); bake device: {report['device']}")
    print()
    print(f"{'step':<10}{'wall s':>10}{'CPU s':>8}{'peak RSS GiB':>15}{'GB written':>13}")
    for result in report["steps"].values():
        if result.error:
            print(f"{result.step:<10}  FAILED ({result.error})")
            continue
        print(f"{result.step:<10}{_cell(result.wall_s, 1):>10}{_cell(result.cpu_s, 1):>8}"
              f"{_cell(result.peak_rss_gib, 2):>15}{_cell(result.gb_written, 2):>13}")
    print()
    print_phases(report["steps"])
    for target in report["targets"]:
        sign = "<=" if target.at_most else ">="
        value = "-" if target.value is None else f"{target.value:.2f}{target.unit}"
        goal = f"target {sign} {target.limit:g}{target.unit}"
        print(f"{target.label:<22}{value:>10}   {goal:<20}{target.verdict}")
    if (verification := report["verify"]) is not None:
        print()
        total = verification["identical"] + len(verification["differing"])
        print(f"bake vs naive: {verification['identical']}/{total} tensors identical, "
              f"max abs diff {verification['max_abs_diff']:.3g}, "
              f"{len(verification['missing'])} tensors in only one output")


def report_as_json(report: dict) -> str:
    return json.dumps({
        "revision": report["revision"],
        "checkpoint": report["checkpoint"],
        "steps": {name: vars(result) for name, result in report["steps"].items()},
        "targets": [{**vars(t), "verdict": t.verdict} for t in report["targets"]],
        "device": report["device"],
        "verify": report["verify"],
    }, indent=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers (default: 32, the real model)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/so8t-bench"),
                        help="where the checkpoint is cached and outputs are written")
    parser.add_argument("--keep", action="store_true", help="keep every step's output directory")
    parser.add_argument("--verify", action="store_true",
                        help="also check that the bake's output equals the naive path's, tensor by tensor")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of cp, cp-direct, bake and bake-warm; the best counts")
    parser.add_argument("--adapter", choices=("so8t", "lora"), default="so8t",
                        help="a full SO8T adapter (default) or a plain rank-16 LoRA on every projection")
    parser.add_argument("--device", default="auto",
                        help="where the bake folds (SO8T_BAKE_DEVICE): auto (a GPU when one is visible), host, cuda")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run (default: all)")
    # Internal: run one step and print its measurements (the parent invokes this).
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers < 1 or args.repeat < 1:
        parser.error("--layers and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        run_step_here(args.step, args.model_dir, args.adapter_dir, args.out_dir)
        return 0
    report = run_benchmark(args)
    if args.json:
        print(report_as_json(report))
    else:
        print_report(report)
    failed = any(result.error for result in report["steps"].values())
    return 1 if failed else 0  # missed targets are results, not failures


if __name__ == "__main__":
    sys.exit(main())
