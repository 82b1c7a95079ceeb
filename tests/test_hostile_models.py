"""Hostile model and adapter directories, run through the real CLI.

Each refused input gives exit 2 and one line naming the file (and the tensor or field), within
10 s, with nothing in the cache's objects/. A few hostile-looking inputs are fine (a link that stays
inside the directory, a hub cache snapshot) and build. The corpus is built from the tiny Llama
(4 heads, 2 KV heads, hidden 64, head_dim 16) with an SO8T and a LoRA adapter beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from so8t_deploy.demo import DEMO_MANIFEST

from .conftest import error_lines
from .test_adapters import make_lora

pytestmark = pytest.mark.llamacpp  # the accepted inputs are built into a GGUF

TIME_BOUND_S = 10.0
WEIGHTS = "model.safetensors"
SO8T_WEIGHTS = "so8t_adapter.safetensors"
LORA_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Inputs:
    """One case's copies: the model, both adapters, and a file outside all of them (a stand-in for /etc/shadow)."""

    model: Path
    so8t: Path
    lora: Path
    secret: Path


@pytest.fixture(scope="module")
def originals(tiny_model, so8t_adapter, tmp_path_factory):
    model = tiny_model("llama", num_kv_heads=2)
    sharded = tiny_model("llama", num_kv_heads=2, max_shard_size="200KB")
    lora = make_lora(model, tmp_path_factory.mktemp("lora") / "lora", ["q_proj", "v_proj"])
    return {"model": model, "sharded": sharded, "so8t": so8t_adapter(64, 2), "lora": lora}


@pytest.fixture
def make_inputs(originals, tmp_path) -> Callable[..., Inputs]:
    def make(sharded: bool = False) -> Inputs:
        secret = tmp_path / "shadow"
        secret.write_text("root:$6$not-for-the-cache$:19000:0:99999:7:::\n")
        return Inputs(shutil.copytree(originals["sharded" if sharded else "model"], tmp_path / "model"),
                      shutil.copytree(originals["so8t"], tmp_path / "so8t"),
                      shutil.copytree(originals["lora"], tmp_path / "lora"), secret)

    return make


# ---------------------------------------------------------------- ways to spoil an input


def edit_tensors(path: Path, changes: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    tensors = load_file(path)
    for name, change in changes.items():
        tensors[name] = change(tensors[name].clone()).contiguous()
    save_file(tensors, path)


def add_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    save_file({**load_file(path), name: tensor}, path)


def drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path)


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header in place, data untouched (offsets are relative to the data)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])


def edit_config(model: Path, **changes: object) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))


def poke(index: tuple[int, ...], value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor[index] = value
        return tensor

    return change


def negate_lm_head(header: dict) -> None:
    # [-320, -64] has the byte count of [320, 64]: only the sign says it is no tensor.
    header["lm_head.weight"]["shape"] = [-n for n in header["lm_head.weight"]["shape"]]


def replace_with_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def link(path: Path, target: Path | str) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def link_to_inside_directory(inputs: Inputs) -> None:
    (inputs.model / "sub").mkdir()
    (inputs.model / "loop").symlink_to("sub")


def second_shard(model: Path) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2, shards
    return model / shards[1]


def move_into_blobs(inputs: Inputs) -> None:
    """The weights moved to blobs/ and linked back, relatively: a link that stays inside."""
    model = inputs.model
    (model / "blobs").mkdir()
    (model / WEIGHTS).rename(model / "blobs" / "weights")
    (model / WEIGHTS).symlink_to(Path("blobs") / "weights")


def snapshot_dir(inputs: Inputs) -> Path:
    return inputs.model.parent / "hub" / "models--org--tiny" / "snapshots" / ("c0ffee" * 6 + "c0ff")


def as_hub_snapshot(inputs: Inputs) -> Path:
    """huggingface_hub's cache layout: snapshots/<commit>/NAME -> ../../blobs/<hash>."""
    snapshot = snapshot_dir(inputs)
    repo = snapshot.parents[1]
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, item in enumerate(sorted(inputs.model.iterdir())):
        item.rename(repo / "blobs" / f"blob{i}")
        (snapshot / item.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    inputs.model.rmdir()
    return snapshot


def link_to_other_repo(inputs: Inputs) -> Path:
    """A snapshot whose config links into another repo's blobs: the hub rule allows its own repo only."""
    snapshot = as_hub_snapshot(inputs)
    other = snapshot.parents[2] / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (snapshot / "config.json").resolve().rename(other / "config")
    link(snapshot / "config.json", Path("..", "..", "..", "models--org--other", "blobs", "config"))
    return snapshot


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    spoil: Callable[[Inputs], object]  # a Path it returns is the model directory to use instead
    message: str  # a substring of the one error line
    culprit: Callable[[Inputs], Path]  # the file the line must name
    commands: tuple[str, ...] = ("validate", "build")
    sharded: bool = False


VALIDATE_PLAN_BUILD = ("validate", "plan", "build")
L0, L1 = "model.layers.0", "model.layers.1"


def in_model(name: str) -> Callable[[Inputs], Path]:
    return lambda i: i.model / name


CONFIG = in_model("config.json")
SHARD = in_model(WEIGHTS)

REFUSED: dict[str, Case] = {
    # shapes: refused from the header alone, at validate and before a build bakes anything
    "lm-head-empty": Case(lambda i: edit_tensors(i.model / WEIGHTS, {"lm_head.weight": lambda t: t.new_empty(0)}),
                          "tensor 'lm_head.weight' has shape [0]: every dimension must be at least 1", SHARD),
    "negative-dims": Case(lambda i: edit_header(i.model / WEIGHTS, negate_lm_head),
                          "tensor 'lm_head.weight' has shape [-320, -64]: every dimension", SHARD),
    "q-proj-wrong-width": Case(
        lambda i: edit_tensors(i.model / WEIGHTS, {f"{L1}.self_attn.q_proj.weight": lambda t: t[:, :48]}),
        f"tensor '{L1}.self_attn.q_proj.weight' has shape [64, 48], but config.json implies "
        "[64 (num_attention_heads*head_dim), 64 (hidden_size)]", SHARD),
    "hidden-not-config": Case(lambda i: edit_config(i.model, hidden_size=128),
                              "tensor 'model.embed_tokens.weight' has shape [320, 64], but config.json implies "
                              "[320 (vocab_size), 128 (hidden_size)]", SHARD),
    "vocab-not-config": Case(lambda i: edit_config(i.model, vocab_size=321),
                             "tensor 'model.embed_tokens.weight' has shape [320, 64], but config.json implies "
                             "[321 (vocab_size)", SHARD),
    "intermediate-not-config": Case(lambda i: edit_config(i.model, intermediate_size=96),
                                    "tensor 'model.layers.0.mlp.down_proj.weight' has shape [64, 128], but "
                                    "config.json implies [64 (hidden_size), 96 (intermediate_size)]", SHARD),
    "kv-heads-not-config": Case(lambda i: edit_config(i.model, num_key_value_heads=1),
                                "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [32, 64], but config.json "
                                "implies [16 (num_key_value_heads*head_dim)", SHARD),
    "layers-not-config": Case(lambda i: edit_config(i.model, num_hidden_layers=1),
                              "is past the last layer (config.json num_hidden_layers: 1)", SHARD),
    "bias-wrong-length": Case(
        lambda i: add_tensor(i.model / WEIGHTS, f"{L1}.self_attn.o_proj.bias", torch.zeros(8)),
        f"tensor '{L1}.self_attn.o_proj.bias' has shape [8], but its weight has 64 rows", SHARD),
    "untied-lm-head-missing": Case(lambda i: drop_tensor(i.model / WEIGHTS, "lm_head.weight"),
                                   "implies tensor 'lm_head.weight' (tie_word_embeddings is false), which the "
                                   "checkpoint lacks", CONFIG),
    "layer-tensor-missing": Case(lambda i: drop_tensor(i.model / WEIGHTS, f"{L1}.mlp.up_proj.weight"),
                                 f"implies tensor '{L1}.mlp.up_proj.weight', which the checkpoint lacks", CONFIG),
    "integer-weight": Case(lambda i: edit_tensors(i.model / WEIGHTS, {"model.norm.weight": lambda t: t.int()}),
                           "tensor 'model.norm.weight' is I32, not a float tensor", SHARD),
    # config.json sizes that cannot make a model
    "heads-zero": Case(lambda i: edit_config(i.model, num_attention_heads=0),
                       "num_attention_heads: must be a positive integer, got 0", CONFIG),
    "kv-heads-negative": Case(lambda i: edit_config(i.model, num_key_value_heads=-2),
                              "num_key_value_heads: must be a positive integer, got -2", CONFIG),
    "heads-not-dividing-hidden": Case(lambda i: edit_config(i.model, num_attention_heads=5),
                                      "num_attention_heads: 5 does not divide hidden_size 64", CONFIG),
    "kv-heads-not-dividing-heads": Case(lambda i: edit_config(i.model, num_key_value_heads=3),
                                        "num_key_value_heads: 3 does not divide num_attention_heads 4", CONFIG),
    "hidden-a-string": Case(lambda i: edit_config(i.model, hidden_size="64"),
                            "hidden_size: must be a positive integer, got '64'", CONFIG),
    # damaged files (held before this issue; kept)
    "missing-shard": Case(lambda i: second_shard(i.model).unlink(),
                          "missing shard (listed in model.safetensors.index.json)",
                          lambda i: second_shard(i.model), sharded=True),
    "truncated-safetensors": Case(lambda i: (i.model / WEIGHTS).write_bytes((i.model / WEIGHTS).read_bytes()[:-100]),
                                  "truncated safetensors file", SHARD),
    "garbled-header": Case(lambda i: (i.model / WEIGHTS).write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all"
                                                                      + b"\0" * 64),
                           "corrupt safetensors header", SHARD),
    # weights: proven finite as the bake streams them, so validate (headers only) cannot see these
    "nan-base-weight": Case(
        lambda i: edit_tensors(i.model / WEIGHTS, {f"{L1}.mlp.down_proj.weight": poke((3, 5), float("nan"))}),
        f"tensor '{L1}.mlp.down_proj.weight' contains NaN or infinity (first: NaN at [3, 5])", SHARD, ("build",)),
    "inf-base-weight": Case(lambda i: edit_tensors(i.model / WEIGHTS, {"model.norm.weight": poke((7,), float("-inf"))}),
                            "tensor 'model.norm.weight' contains NaN or infinity (first: infinity at [7])", SHARD,
                            ("build",)),
    "inf-in-a-folded-weight": Case(
        lambda i: edit_tensors(i.model / WEIGHTS, {f"{L0}.self_attn.q_proj.weight": poke((0, 0), float("inf"))}),
        f"tensor '{L0}.self_attn.q_proj.weight' contains NaN or infinity (first: infinity at [0, 0])",
        SHARD, ("build",)),
    "nan-in-so8t-adapter": Case(
        lambda i: edit_tensors(i.so8t / SO8T_WEIGHTS, {"layers.1.attn_in.generator": poke((0, 1, 2), float("nan"))}),
        "tensor 'layers.1.attn_in.generator' contains NaN or infinity", lambda i: i.so8t / SO8T_WEIGHTS),
    "nan-in-lora-adapter": Case(
        lambda i: edit_tensors(i.lora / LORA_WEIGHTS, {
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": poke((2, 1), float("nan"))}),
        "v_proj.lora_B.weight' contains NaN or infinity", lambda i: i.lora / LORA_WEIGHTS),
    # entries that are not regular files, and links that leave home: refused before anything is read
    "fifo-in-model": Case(lambda i: replace_with_fifo(i.model / "notes.txt"),
                          "a FIFO; only regular files are read", in_model("notes.txt"), VALIDATE_PLAN_BUILD),
    "fifo-as-config": Case(lambda i: replace_with_fifo(i.model / "config.json"),
                           "a FIFO; only regular files are read", CONFIG, VALIDATE_PLAN_BUILD),
    "fifo-in-so8t-adapter": Case(lambda i: replace_with_fifo(i.so8t / "so8t_config.json"),
                                 "a FIFO; only regular files are read", lambda i: i.so8t / "so8t_config.json",
                                 VALIDATE_PLAN_BUILD),
    "symlink-out-of-model": Case(lambda i: link(i.model / "tokenizer.json", i.secret),
                                 "a symlink to", in_model("tokenizer.json"), VALIDATE_PLAN_BUILD),
    "relative-symlink-out-of-model": Case(lambda i: link(i.model / "extra.txt", Path("..", "shadow")),
                                          "a symlink to ../shadow, outside", in_model("extra.txt"),
                                          VALIDATE_PLAN_BUILD),
    "symlink-out-of-so8t-adapter": Case(lambda i: link(i.so8t / "README.md", i.secret),
                                        "only links that stay inside are followed", lambda i: i.so8t / "README.md",
                                        VALIDATE_PLAN_BUILD),
    "symlink-out-of-lora-adapter": Case(lambda i: link(i.lora / "tokenizer.json", i.secret),
                                        "only links that stay inside are followed", lambda i: i.lora / "tokenizer.json",
                                        VALIDATE_PLAN_BUILD),
    "symlink-to-a-directory": Case(lambda i: link(i.model / "etc", "/etc"), "a symlink to /etc, outside",
                                   in_model("etc"), VALIDATE_PLAN_BUILD),
    "symlink-to-an-inside-directory": Case(link_to_inside_directory, "a symlink to a directory",
                                           in_model("loop"), VALIDATE_PLAN_BUILD),
    "broken-symlink": Case(lambda i: link(i.model / "tokenizer.json", "nowhere.json"),
                           "a broken symlink", in_model("tokenizer.json"), VALIDATE_PLAN_BUILD),
    "hub-snapshot-linking-another-repo": Case(link_to_other_repo, "only links that stay inside are followed",
                                              lambda i: snapshot_dir(i) / "config.json",
                                              VALIDATE_PLAN_BUILD),
}


# ---------------------------------------------------------------- running a case


def write_manifest(path: Path, model: Path, inputs: Inputs) -> Path:
    adapters = (f"    - {{kind: so8t, path: {inputs.so8t}}}\n"
                f"    - {{kind: lora, path: {inputs.lora}, allow_base_mismatch: true}}\n")
    text = (DEMO_MANIFEST.replace("./model", str(model))
            .replace("    - {kind: so8t, path: ./adapters/so8t}\n", adapters)
            .replace("    light: {rotation: 0.1, ffn: 0.05, triality: 0.02}\n", "")
            .replace("quantize: [f16, q8_0]", "quantize: [f16]"))
    path.write_text(text)
    return path


class Hung(BaseException):
    """Raised into a command that outlived the watchdog; a BaseException, so no error boundary takes it."""


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Interrupt a command that blocks (a FIFO opened for reading never returns): the case fails, not hangs."""
    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(run_cli, command: str, manifest: Path, cache: Path):
    args = {"validate": ["validate", manifest], "plan": ["plan", manifest, "--offline", "--cache-dir", cache],
            "build": ["build", manifest, "--cache-dir", cache]}[command]
    with watchdog(3 * TIME_BOUND_S):
        return run_cli(*args)


def published(cache: Path) -> list[Path]:
    objects = cache / "objects"
    return sorted(p for p in objects.rglob("*") if p.is_file()) if objects.exists() else []


@pytest.mark.parametrize("case", sorted(REFUSED), ids=str)
def test_hostile_input_is_refused_in_one_line(make_inputs, run_cli, tmp_path, case):
    spec = REFUSED[case]
    inputs = make_inputs(spec.sharded)
    model = replaced if isinstance(replaced := spec.spoil(inputs), Path) else inputs.model
    manifest = write_manifest(tmp_path / "manifest.yaml", model, inputs)
    cache = tmp_path / "cache"
    for command in spec.commands:
        started = time.monotonic()
        result = run(run_cli, command, manifest, cache)
        elapsed = time.monotonic() - started
        lines = error_lines(result.err)
        assert result.code == 2, f"{command}: exit {result.code}: {result.err}"
        assert len(lines) == 1, f"{command}: {result.err}"
        assert spec.message in lines[0], f"{command}: {lines[0]}"
        assert str(spec.culprit(inputs)) in lines[0], f"{command}: {lines[0]}"
        assert "Traceback" not in result.out + result.err
        assert elapsed < TIME_BOUND_S, f"{command} took {elapsed:.1f} s"
        assert published(cache) == [], f"{command} published {published(cache)}"
    assert inputs.secret.read_text().startswith("root:")  # read by nobody, moved by nobody


def test_every_input_that_is_read_is_checked_before_any_weight(make_inputs, run_cli, tmp_path):
    """The order of the checks: a FIFO beside a NaN weight is found before the weight is read (no hang,
    no half-bake), and a build that fails on a weight leaves the cache's digests but no object."""
    inputs = make_inputs()
    edit_tensors(inputs.model / WEIGHTS, {"model.norm.weight": poke((0,), float("nan"))})
    replace_with_fifo(inputs.model / "notes.txt")
    manifest = write_manifest(tmp_path / "manifest.yaml", inputs.model, inputs)
    result = run(run_cli, "build", manifest, tmp_path / "cache")
    assert result.code == 2 and "a FIFO" in result.err
    (inputs.model / "notes.txt").unlink()
    result = run(run_cli, "build", manifest, tmp_path / "cache")
    assert result.code == 2 and "contains NaN" in result.err
    assert published(tmp_path / "cache") == []


ACCEPTED: dict[str, Callable[[Inputs], object]] = {
    "symlink-inside-the-model": move_into_blobs,
    "hub-cache-snapshot": as_hub_snapshot,
    "symlink-inside-an-adapter": lambda i: link(i.so8t / "README.md", SO8T_WEIGHTS),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED), ids=str)
def test_links_that_stay_inside_are_followed_and_build(make_inputs, run_cli, tmp_path, case):
    inputs = make_inputs()
    model = replaced if isinstance(replaced := ACCEPTED[case](inputs), Path) else inputs.model
    manifest = write_manifest(tmp_path / "manifest.yaml", model, inputs)
    cache = tmp_path / "cache"
    assert run(run_cli, "validate", manifest, cache).code == 0
    result = run(run_cli, "build", manifest, cache)
    assert result.code == 0, result.err
    ggufs = [p for p in published(cache) if p.suffix == ".gguf"]
    assert ggufs, published(cache)
