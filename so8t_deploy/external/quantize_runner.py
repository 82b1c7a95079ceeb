"""Run llama.cpp's quantizer in a child process: `python -m so8t_deploy.external.quantize_runner ...`.

It prints `so8t-progress DONE TOTAL` per tensor on stdout (the parent's progress bar) and llama.cpp's
own log on stderr (shown by the parent with -v). SIGINT is left at its default, so Ctrl-C ends it
at once even inside llama_model_quantize, where no Python handler could run.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .child import die_with_parent, report_progress
from .imatrix import load_imatrix
from .llama_log import LOGGER, tensor_progress, watching

if TYPE_CHECKING:  # llama_cpp is imported where it is used
    from llama_cpp import llama_model_imatrix_data, llama_model_kv_override


def _imatrix_array(entries: dict[str, list[float]]) -> tuple[ctypes.Array[llama_model_imatrix_data],
                                                              list[tuple[ctypes.Array[ctypes.c_float], bytes]]]:
    """A NULL-terminated llama_model_imatrix_data[] plus the buffers it points into."""
    import llama_cpp

    struct = llama_cpp.llama_model_imatrix_data
    array = (struct * (len(entries) + 1))()
    buffers = []
    for i, (name, values) in enumerate(entries.items()):
        data = (ctypes.c_float * len(values))(*values)
        encoded = name.encode()
        buffers.append((data, encoded))
        # The field is a float*: cast views the array's first element (no copy); `buffers` keeps it alive.
        pointer = ctypes.cast(data, ctypes.POINTER(ctypes.c_float))
        array[i].name, array[i].data, array[i].size = encoded, pointer, len(values)
    return array, buffers


def _kv_overrides(pairs: list[str]) -> ctypes.Array[llama_model_kv_override]:
    """A key-terminated llama_model_kv_override[] from KEY=int:N / KEY=str:TEXT, as llama-quantize's
    --override-kv: llama_model_quantize writes each into the output's metadata (ints as u32)."""
    import llama_cpp

    array = (llama_cpp.llama_model_kv_override * (len(pairs) + 1))()
    for item, pair in zip(array, pairs, strict=False):
        key, _, typed = pair.partition("=")
        kind, _, value = typed.partition(":")
        item.key = key.encode()
        if kind == "int":
            item.tag, item.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(value)
        else:
            item.tag, item.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()
    return array


def main(argv: list[str]) -> int:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    parser = argparse.ArgumentParser(prog="quantize_runner")
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("ftype", type=int)
    parser.add_argument("--imatrix", type=Path)
    parser.add_argument("--kv", action="append", default=[], help="KEY=int:N or KEY=str:TEXT, written as metadata")
    parser.add_argument("--allow-requantize", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    import logging

    import llama_cpp

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = args.ftype, args.threads, args.allow_requantize
    keepalive = None
    if args.imatrix is not None:
        keepalive = _imatrix_array(load_imatrix(args.imatrix))
        params.imatrix = ctypes.cast(keepalive[0], type(params.imatrix))
    overrides = _kv_overrides(args.kv) if args.kv else None
    if overrides is not None:
        params.kv_overrides = ctypes.cast(overrides, type(params.kv_overrides))
    with watching(tensor_progress(report_progress)):
        rc = llama_cpp.llama_model_quantize(str(args.source).encode(), str(args.out).encode(), ctypes.byref(params))
    del keepalive, overrides
    LOGGER.debug("llama_model_quantize returned %d", rc)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
