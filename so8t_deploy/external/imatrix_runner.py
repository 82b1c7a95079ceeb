"""Compute an importance matrix in a child process: `python -m so8t_deploy.external.imatrix_runner ...`.

llama-imatrix's statistics, collected through llama-cpp-python instead of a tool built for it: llama.cpp
calls an eval callback for every node of the graph it computes (`llama_context_params.cb_eval`), and the
callback here does what the tool's `IMatrixCollector::collect_imatrix` does with each matrix
multiplication's input. The text is cut into chunks as the tool's `compute_imatrix` cuts it, and the
result is written as its `save_imatrix` writes it.

The protocol to the parent is quantize_runner's: `so8t-progress DONE TOTAL` on stdout after each chunk,
llama.cpp's log on stderr. An input that cannot give an importance matrix (too little text) exits with
USAGE_EXIT and one line `so8t-reason REASON`. SIGINT is left at its default, so Ctrl-C ends it at once,
even inside llama_decode.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .child import die_with_parent, report_progress
from .imatrix import write_imatrix
from .llama_log import LOGGER, route_llama_log

USAGE_EXIT = 3
REASON_PREFIX = "so8t-reason "
MIN_ROWS = 16  # collect_imatrix skips dense products over fewer rows (single-token decodes)

# From the pinned ggml.h (llama-cpp-python 0.3.36's vendor/llama.cpp/ggml/include/ggml.h), checked against
# the loaded library at start (GgmlBase.check): a layout that drifted would read garbage, not fail.
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
GGML_OP_MUL_MAT = 29
GGML_OP_MUL_MAT_ID = 30
_GGML_OBJECT_SIZE = 32  # ggml.c's struct ggml_object: ggml_tensor_overhead() is this plus the tensor


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` as the pinned ggml.h declares it (pointers to other tensors as addresses)."""

    _fields_ = [
        ("type", ctypes.c_int),  # enum ggml_type
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),  # elements per dimension, innermost first
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),  # stride in bytes per dimension
        ("op", ctypes.c_int),  # enum ggml_op
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class CollectError(Exception):
    """What makes llama-imatrix exit mid-run (non-finite sums, shapes that change between calls)."""


def filter_tensor_name(name: str) -> str:
    """The weight's own name, as llama-imatrix's filter_tensor_name has it.

    CUDA0#blk.0.attn_k.weight#0 -> blk.0.attn_k.weight
    """
    _, hash_mark, rest = name.partition("#")
    return rest.partition("#")[0] if hash_mark else name


@dataclass
class Stats:
    """One weight's running statistics: IMatrixCollector's Stats, in float64 rather than float."""

    values: np.ndarray = field(default_factory=lambda: np.zeros(0))  # n_mat * ne0 sums of squares
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # rows summed, 1 or per matrix


class Collector:
    """collect_imatrix's arithmetic on arrays already read from the graph (numpy views of ggml tensors:
    dimensions outermost first, so a tensor with ne [ne0, ne1, ne2, ne3] is an array [ne3, ne2, ne1, ne0])."""

    def __init__(self) -> None:
        self.stats: dict[str, Stats] = {}

    def add_dense(self, name: str, src0_ne: tuple[int, int, int, int], src1: np.ndarray) -> None:
        """GGML_OP_MUL_MAT: every row of src1 is an input of weight `name` (shape src0_ne)."""
        ne3, ne2, ne1, ne0 = src1.shape
        n_mat = src0_ne[2] * src0_ne[3]
        e = self.stats.setdefault(name, Stats())
        # one count per dense tensor (IMatrixCollector folds equal per-matrix counts back to one)
        if e.counts.size > 1 and (e.counts == e.counts[0]).all():
            e.counts = e.counts[:1].copy()
        if e.values.size == 0:
            e.values, e.counts = np.zeros(ne0 * n_mat), np.zeros(1, dtype=np.int64)
        elif e.values.size != ne0 * n_mat:
            raise CollectError(f"inconsistent size for {name} ({e.values.size} vs {ne0 * n_mat})")
        squares = np.square(src1, dtype=np.float64).sum(axis=2).reshape(ne3 * ne2, ne0)
        # a 3-D+ activation broadcast over a 2-D weight folds into its one matrix
        i3, i2 = np.divmod(np.arange(ne3 * ne2), ne2)
        mat_id = (i3 % src0_ne[3]) * src0_ne[2] + (i2 % src0_ne[2])
        np.add.at(e.values.reshape(n_mat, ne0), mat_id, squares)
        if not np.isfinite(e.values).all():
            raise CollectError(f"non-finite values detected in {name}")
        e.counts += (ne1 * ne2 * ne3) // n_mat

    def add_indirect(self, name: str, n_as: int, src1: np.ndarray, ids: np.ndarray) -> None:
        """GGML_OP_MUL_MAT_ID: src1 [n_tokens, n_used or 1, ne0] goes to the experts ids [n_tokens, n_used] of
        weight `name` (n_as experts); each expert's statistics are its own."""
        n_tokens, ne11, ne0 = src1.shape
        if ids.shape[0] != n_tokens:
            raise CollectError(f"{name}: {ids.shape[0]} expert choices for {n_tokens} tokens")
        e = self.stats.setdefault(name, Stats())
        if e.counts.size == 1 and n_as > 1:  # broadcast, as when the tool merges an old imatrix
            e.counts = np.full(n_as, e.counts[0], dtype=np.int64)
        if e.values.size == 0:
            e.values, e.counts = np.zeros(ne0 * n_as), np.zeros(n_as, dtype=np.int64)
        elif e.values.size != ne0 * n_as:
            raise CollectError(f"inconsistent size for {name} ({e.values.size} vs {ne0 * n_as})")
        elif e.counts.size != n_as:
            raise CollectError(f"inconsistent expert count for {name} ({e.counts.size} vs {n_as})")
        if ids.size and (ids.min() < 0 or ids.max() >= n_as):
            raise CollectError(f"{name}: expert id out of range 0..{n_as - 1}")
        acc = e.values.reshape(n_as, ne0)
        for idx in range(ids.shape[1]):
            experts = ids[:, idx]
            np.add.at(acc, experts, np.square(src1[:, idx % ne11, :], dtype=np.float64))
            e.counts += np.bincount(experts, minlength=n_as)
        touched = np.unique(ids)  # only experts routed to are checked, as the tool does
        if not np.isfinite(acc[touched]).all():
            raise CollectError(f"non-finite values detected in {name}")

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(sums, counts) per name for write_imatrix: sums (len(counts), n) with n the values per count."""
        sums = {name: e.values.reshape(e.counts.size, -1) for name, e in self.stats.items()}
        return sums, {name: e.counts.copy() for name, e in self.stats.items()}


class GgmlBase:
    """The few functions of ggml-base the callback needs, from the library llama_cpp itself loaded."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(str(_ggml_base_path()))
        self.tensor_get = lib.ggml_backend_tensor_get  # copies from host and device buffers alike
        self.tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.tensor_get.restype = None
        self.nbytes = lib.ggml_nbytes
        self.nbytes.argtypes, self.nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
        self._lib = lib

    def check(self) -> None:
        """Refuse a library whose tensor layout or enums differ from the ones declared here."""
        lib = self._lib
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        lib.ggml_op_name.argtypes, lib.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
        lib.ggml_type_name.argtypes, lib.ggml_type_name.restype = [ctypes.c_int], ctypes.c_char_p
        expected = {"sizeof(struct ggml_tensor)": (lib.ggml_tensor_overhead() - _GGML_OBJECT_SIZE,
                                                   ctypes.sizeof(GgmlTensor)),
                    "GGML_OP_MUL_MAT": (lib.ggml_op_name(GGML_OP_MUL_MAT), b"MUL_MAT"),
                    "GGML_OP_MUL_MAT_ID": (lib.ggml_op_name(GGML_OP_MUL_MAT_ID), b"MUL_MAT_ID"),
                    "GGML_TYPE_F32": (lib.ggml_type_name(GGML_TYPE_F32), b"f32"),
                    "GGML_TYPE_I32": (lib.ggml_type_name(GGML_TYPE_I32), b"i32")}
        for what, (found, declared) in expected.items():
            if found != declared:
                raise RuntimeError(f"the loaded ggml is not the pinned one: {what} is {found!r}, not {declared!r}")

    def read(self, address: int, tensor: GgmlTensor, dtype: type[np.generic]) -> np.ndarray:
        """A copy of the tensor's bytes, viewed with its own strides ([ne3, ne2, ne1, ne0])."""
        if tensor.nb[0] != np.dtype(dtype).itemsize:
            name = tensor.name.decode(errors="replace")
            raise CollectError(f"{name}: not {np.dtype(dtype).name} with contiguous rows")
        nbytes = self.nbytes(address)
        buffer = np.empty(nbytes, dtype=np.uint8)
        self.tensor_get(address, buffer.ctypes.data, 0, nbytes)
        return np.ndarray(shape=tuple(reversed(tensor.ne)), dtype=dtype, buffer=buffer,
                          strides=tuple(reversed(tensor.nb)))


def _ggml_base_path() -> Path:
    """libggml-base beside llama_cpp's libllama (or in $LLAMA_CPP_LIB_PATH, which llama_cpp honours too)."""
    import llama_cpp

    lib_dir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    raise RuntimeError(f"{lib_dir}: no ggml-base library beside llama_cpp's")


class EvalCallback:
    """cb_eval: llama.cpp asks (ask=True) whether a node is wanted, then hands each wanted node over computed."""

    def __init__(self, ggml: GgmlBase, collector: Collector) -> None:
        import llama_cpp

        self.ggml, self.collector = ggml, collector
        self.error: str | None = None
        self.c_function = llama_cpp.ggml_backend_sched_eval_callback(self._call)  # kept alive with self

    def _call(self, address: int, ask: bool, user_data: Any) -> bool:
        # An exception cannot cross back into C (ctypes would print it and return false): keep the first one,
        # decline everything after it, and let the chunk loop report it.
        if self.error is not None:
            return False
        try:
            tensor = GgmlTensor.from_address(address)
            if ask:
                return self._wanted(tensor)
            self._collect(tensor)
            return True
        except Exception as e:  # reported after llama_decode returns
            self.error = str(e) if isinstance(e, CollectError | RuntimeError) else f"{type(e).__name__}: {e}"
            return False

    @staticmethod
    def _wanted(t: GgmlTensor) -> bool:
        """collect_imatrix's ask: every MUL_MAT_ID, and MUL_MAT over >= 16 f32 rows into a blk.* weight."""
        if t.op == GGML_OP_MUL_MAT_ID:
            return True
        if t.op != GGML_OP_MUL_MAT:
            return False
        src0, src1 = GgmlTensor.from_address(t.src[0]), GgmlTensor.from_address(t.src[1])
        if src1.ne[1] < MIN_ROWS or src1.type != GGML_TYPE_F32:
            return False
        return filter_tensor_name(src0.name.decode(errors="replace")).startswith("blk.")

    def _collect(self, t: GgmlTensor) -> None:
        src0, src1 = GgmlTensor.from_address(t.src[0]), GgmlTensor.from_address(t.src[1])
        name = filter_tensor_name(src0.name.decode(errors="replace"))
        x = self.ggml.read(t.src[1], src1, np.float32)
        if t.op != GGML_OP_MUL_MAT_ID:
            self.collector.add_dense(name, (src0.ne[0], src0.ne[1], src0.ne[2], src0.ne[3]), x)
            return
        if src1.ne[3] != 1:  # the per-expert layout has no place for a 4th dimension
            raise CollectError(f"tensor has more than 3 dimensions: {name}")
        ids = self.ggml.read(t.src[2], GgmlTensor.from_address(t.src[2]), np.int32)  # [1, 1, n_tokens, n_used]
        self.collector.add_indirect(name, src0.ne[2], x[0], ids[0, 0])


@dataclass(frozen=True)
class Chunking:
    tokens: list[int]
    ctx: int
    n_chunks: int
    bos: int | None  # replaces each chunk's first token when the vocabulary adds a BOS


def _tokenize(vocab: Any, text: bytes, parse_special: bool) -> list[int]:
    """common_tokenize(vocab, text, add_special=true, parse_special): a negative count is the size needed."""
    import llama_cpp

    capacity = len(text) + 2
    for _ in range(2):
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), tokens, capacity, True, parse_special)
        if n >= 0:
            return list(tokens[:n])
        capacity = -n
    raise RuntimeError("llama_tokenize failed")


def _chunking(model: Any, text_file: Path, ctx: int, chunks: int | None, parse_special: bool) -> Chunking | str:
    """The chunks compute_imatrix evaluates, or why there are none."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(model)
    text = text_file.read_bytes()
    text = text.removesuffix(b"\n")  # llama.cpp's -f drops one final newline
    tokens = _tokenize(vocab, text, parse_special)
    if len(tokens) < 2 * ctx:
        return f"the calibration text has {len(tokens)} tokens; ctx {ctx} needs at least {2 * ctx}"
    n_chunks = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
    return Chunking(tokens, ctx, n_chunks, bos)


def _decode_chunks(lctx: Any, chunking: Chunking, callback: EvalCallback) -> None:
    """One llama_decode per chunk, every token an output so that the last layer computes all rows."""
    import llama_cpp

    ctx = chunking.ctx
    batch = llama_cpp.llama_batch_init(ctx, 0, 1)
    try:
        for i in range(chunking.n_chunks):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
            window = chunking.tokens[i * ctx:(i + 1) * ctx]
            if chunking.bos is not None:
                window[0] = chunking.bos
            batch.n_tokens = ctx
            for k, token in enumerate(window):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, k, 1
                batch.seq_id[k][0], batch.logits[k] = 0, 1
            rc = llama_cpp.llama_decode(lctx, batch)
            if callback.error is not None:
                raise CollectError(callback.error)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed on chunk {i + 1} (returned {rc})")
            report_progress(i + 1, chunking.n_chunks)
    finally:
        llama_cpp.llama_batch_free(batch)


def _usage(reason: str) -> int:
    sys.stderr.write(f"{REASON_PREFIX}{reason}\n")
    sys.stderr.flush()
    return USAGE_EXIT


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="imatrix_runner")
    parser.add_argument("model", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--ctx", type=int, required=True)
    parser.add_argument("--chunks", type=int)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--parse-special", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    args = _parse(argv)
    if args.ctx < MIN_ROWS:
        return _usage(f"ctx {args.ctx} is under {MIN_ROWS}: llama.cpp collects nothing from so few rows")
    if args.chunks is not None and args.chunks < 1:
        return _usage(f"chunks {args.chunks}: must be at least 1")
    import llama_cpp

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
    route_llama_log()
    llama_cpp.llama_backend_init()
    ggml = GgmlBase()
    ggml.check()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0  # on the CPU: a GPU sums in another order, and the key must decide the bytes
    model = llama_cpp.llama_model_load_from_file(str(args.model).encode(), params)
    if not model:
        raise RuntimeError(f"{args.model}: llama.cpp cannot load this model")
    try:
        chunking = _chunking(model, args.text, args.ctx, args.chunks, args.parse_special)
        if isinstance(chunking, str):
            return _usage(chunking)
        collector = Collector()
        callback = EvalCallback(ggml, collector)
        _run(model, chunking, callback, args.threads)
    finally:
        llama_cpp.llama_model_free(model)
    sums, counts = collector.result()
    write_imatrix(args.out, sums, counts, datasets=[args.dataset], chunk_count=chunking.n_chunks,
                  chunk_size=chunking.ctx)
    LOGGER.debug("imatrix: %d entries over %d chunks of %d tokens", len(sums), chunking.n_chunks, chunking.ctx)
    return 0


def _run(model: Any, chunking: Chunking, callback: EvalCallback, threads: int) -> None:
    """A context of one sequence of ctx tokens, decoded in one batch (n_ctx = n_batch = n_ubatch = ctx)."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = chunking.ctx
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = threads
    params.offload_kqv = params.op_offload = False  # all of it on the CPU, as the model's weights (see main)
    params.cb_eval, params.cb_eval_user_data = callback.c_function, None
    lctx = llama_cpp.llama_init_from_model(model, params)
    if not lctx:
        raise RuntimeError("llama.cpp cannot create a context for this model")
    try:
        _decode_chunks(lctx, chunking, callback)
    finally:
        llama_cpp.llama_free(lctx)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (CollectError, RuntimeError, OSError) as error:  # one line for the parent's error, as the tool's
        sys.stderr.write(f"imatrix: {error}\n")
        sys.exit(1)
