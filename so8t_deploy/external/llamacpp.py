"""llama.cpp at one pinned version: its converter (a subprocess) and its quantizer (the library).

The pin is the llama-cpp-python release below. Its sdist vendors llama.cpp, whose
`convert_hf_to_gguf.py`, `conversion/` and `gguf-py/` are extracted once into a cache
directory; its compiled library provides `llama_model_quantize` and inference. The files of its
`models/` directory that tests build tiny models from (vocabulary GGUFs, real chat templates) are
extracted on demand beside the converter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from ..errors import BuildError, ModelError, SettingError, UsageError
from ..fsutil import publish_dir, publish_file, staging_path
from ..manifest.quant_types import QuantType
from ..store.workspace import Workspace, default_root
from .child import last_lines, progress_of, run_child
from .imatrix import load_imatrix
from .llama_log import LOGGER, route_llama_log

if TYPE_CHECKING:  # llama_cpp is an optional dependency, imported where it is used
    import numpy as np
    from llama_cpp import Llama

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CONVERT_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_WRITING = re.compile(r"Writing:\s+(\d+)%")  # the converter's tqdm bar
FLOAT_FILE_TYPES = {0, 1, 32}  # ALL_F32, MOSTLY_F16, MOSTLY_BF16: what quantize may start from
_MARKER = ".so8t-converter.json"


@dataclass(frozen=True)
class Converter:
    root: Path  # holds convert_hf_to_gguf.py, conversion/ and gguf-py/
    version: str

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"


def library_version() -> str:
    """The installed llama-cpp-python, which must be the pinned release."""
    try:
        installed = importlib_metadata.version("llama-cpp-python")
    except importlib_metadata.PackageNotFoundError:
        raise BuildError(
            f"llama-cpp-python is not installed; install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} "
            "(see README: build with CMAKE_ARGS='-DGGML_NATIVE=OFF')"
        ) from None
    if installed != LLAMA_CPP_PYTHON_VERSION:
        raise BuildError(
            f"llama-cpp-python {installed} is installed; so8t-deploy is pinned to {LLAMA_CPP_PYTHON_VERSION}"
        )
    return f"llama-cpp-python {installed}"


def locate_converter(converter_dir: Path | None = None) -> Converter:
    """The pinned converter: $SO8T_LLAMA_CPP_DIR if set, else extracted once into `converter_dir`
    (a workspace's converter/; by default the one under $SO8T_CACHE_DIR)."""
    override = os.environ.get("SO8T_LLAMA_CPP_DIR")
    if override:
        root = Path(override)
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise UsageError(f"SO8T_LLAMA_CPP_DIR={root}: no convert_hf_to_gguf.py there")
        return Converter(root, f"llama.cpp at {root}")
    root = (converter_dir or Workspace(default_root()).converter) / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if not (root / _MARKER).is_file():
        _extract_converter(root)
    return Converter(root, f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (vendored llama.cpp)")


def _find_or_download_sdist(workdir: Path) -> Path:
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    local = os.environ.get("SO8T_LLAMA_CPP_SDIST")
    if local:
        return Path(local)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-q",
               "--disable-pip-version-check", "-d", str(workdir), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not (workdir / name).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BuildError(f"cannot fetch the llama.cpp converter ({name}): {tail[0]}; set SO8T_LLAMA_CPP_SDIST")
    return workdir / name


def _extract_converter(root: Path) -> None:
    """Extract only the converter's files from the pinned sdist, atomically, once per directory."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):  # two builds on a fresh workspace extract once
        if not (root / _MARKER).is_file():
            _extract_converter_unlocked(root)


def _extract_converter_unlocked(root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".converter-") as tmp:
        sdist = _find_or_download_sdist(Path(tmp))
        staging = Path(tmp) / "converter"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        # One forward pass over the compressed stream ("r|gz"): listing the members first and extracting them
        # after decompresses the whole sdist twice.
        with tarfile.open(sdist, "r|gz") as archive:
            for member in archive:
                if not (member.name.startswith(prefix)
                        and member.name[len(prefix):].split("/")[0] in CONVERTER_FILES):
                    continue
                member.name = member.name[len(prefix):]
                if not (member.isfile() or member.isdir()) or ".." in Path(member.name).parts:
                    raise BuildError(f"{sdist}: unexpected archive member {member.name!r}")
                archive.extract(member, staging)  # a regular file or a directory inside staging, checked above
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise BuildError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
        (staging / _MARKER).write_text(json.dumps({"llama-cpp-python": LLAMA_CPP_PYTHON_VERSION}) + "\n")
        publish_dir(staging, root)


LLAMA_CPP_DATA_DIRS = ("models", "tests")  # the source directories tiny models are built from


def locate_llama_cpp_models(names: Iterable[str], converter_dir: Path | None = None, *,
                            directory: str = "models") -> dict[str, Path]:
    """Files of llama.cpp's `models/` directory at the pinned version, by path inside it: its vocabulary
    GGUFs (`ggml-vocab-llama-bpe.gguf`) and the chat templates of real models (`templates/NAME.jinja`);
    with `directory="tests"`, files of its `tests/` directory (`test-chat-template.cpp`, which holds the chat
    templates of further models as C string literals).

    From $SO8T_LLAMA_CPP_DIR/<directory> if that is set, else extracted from the pinned sdist beside the
    converter (in `converter_dir`, by default the one under $SO8T_CACHE_DIR), each file once, atomically.
    """
    if directory not in LLAMA_CPP_DATA_DIRS:
        raise UsageError(f"{directory!r}: not one of llama.cpp's {', '.join(LLAMA_CPP_DATA_DIRS)} directories")
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or name != Path(name).as_posix():
            raise UsageError(f"{name!r}: not a path inside llama.cpp's {directory}/ directory")
    override = os.environ.get("SO8T_LLAMA_CPP_DIR")
    if override:
        found = {name: Path(override) / directory / name for name in wanted}
        if missing := [name for name, path in found.items() if not path.is_file()]:
            raise UsageError(f"SO8T_LLAMA_CPP_DIR={override}: no {directory}/{missing[0]} there")
        return found
    root = ((converter_dir or Workspace(default_root()).converter)
            / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-{directory}")
    found = {name: root / name for name in wanted}
    if any(not path.is_file() for path in found.values()):
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root.parent / f".{root.name}.lock")):
            missing = [name for name, path in found.items() if not path.is_file()]
            if missing:
                _extract_models_unlocked(root, missing, directory)
    return found


def _extract_models_unlocked(root: Path, names: list[str], directory: str) -> None:
    """Extract <directory>/NAME for each name in one pass over the sdist; each file appears complete or not at
    all."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/{directory}/"
    pending = set(names)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".models-") as tmp:
        sdist = _find_or_download_sdist(Path(tmp))
        with tarfile.open(sdist) as archive:
            for member in archive:
                name = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if name not in pending:
                    continue
                source = archive.extractfile(member) if member.isfile() else None
                if source is None:
                    raise BuildError(f"{sdist}: {member.name} is not a regular file")
                staging = Path(tmp) / f"file-{len(names) - len(pending)}"
                with source, open(staging, "wb") as out:
                    shutil.copyfileobj(source, out)
                final = root / name
                final.parent.mkdir(parents=True, exist_ok=True)
                publish_file(staging, final)
                pending.discard(name)
                if not pending:
                    break
    if pending:
        raise BuildError(f"{sdist}: no vendor/llama.cpp/{directory}/{sorted(pending)[0]} inside")


def convert_to_gguf(converter: Converter, model_dir: Path, out_file: Path, outtype: str, *,
                    metadata: dict[str, str] | None = None,
                    on_progress: Callable[[int], None] | None = None) -> None:
    """Run the pinned converter; the GGUF appears at out_file only if it fully succeeded.

    `on_progress(percent)` follows the converter's own progress bar while it writes.
    """
    if outtype not in CONVERT_OUTTYPES:
        raise SettingError("outtype", f"must be one of {', '.join(CONVERT_OUTTYPES)}, got {outtype!r}")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a model directory (no config.json)")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out_file)
    meta = staging.with_name(staging.name + ".metadata.json")  # beside the output: nothing left in /tmp
    meta.write_text(json.dumps(metadata or {}), encoding="utf-8")
    try:
        command = [sys.executable, "-m", "so8t_deploy.external.convert_runner", str(converter.root), str(meta), "--",
                   str(model_dir), "--outfile", str(staging), "--outtype", outtype]

        def follow(line: str) -> None:
            if on_progress and (match := _WRITING.search(line)):
                on_progress(int(match[1]))

        # TMPDIR: whatever the converter spools lives beside its output, in the step's staging directory.
        returncode, log = run_child(command, follow, env={"NO_LOCAL_GGUF": "1", "TMPDIR": str(out_file.parent)})
        if returncode != 0:
            if "is not supported" in log:
                raise ModelError(f"{model_dir}: llama.cpp's converter does not support this architecture "
                                 f"({last_lines(log, 1)})")
            raise BuildError(f"{model_dir}: conversion failed (exit {returncode}): {last_lines(log)}")
        publish_file(staging, out_file)
    finally:
        meta.unlink(missing_ok=True)
        staging.unlink(missing_ok=True)


def gguf_file_type(path: Path) -> int | None:
    from .gguf_info import read_gguf_info

    return read_gguf_info(path).file_type


KV_VALUE_MAX = 127  # llama_model_kv_override holds a string in char[128]


def quantize_gguf(in_file: Path, out_file: Path, quant: QuantType, *, imatrix: Path | None = None,
                  metadata: dict[str, str | int] | None = None, allow_requantize: bool = False,
                  threads: int | None = None, on_progress: Callable[[int, int], None] | None = None) -> None:
    """llama.cpp's quantizer through the pinned library; out_file appears only on success.

    `metadata` is written into the output as llama-quantize's --override-kv writes it (ints as u32): how
    llama-quantize records an importance matrix (`quantize.imatrix.*`), and this project's provenance.
    `on_progress(tensors done, tensors)` follows llama.cpp's per-tensor log lines.
    """
    if quant.needs_imatrix and imatrix is None:
        raise SettingError("imatrix", f"{quant.name} needs an importance matrix")
    file_type = gguf_file_type(in_file)
    if file_type not in FLOAT_FILE_TYPES and not allow_requantize:
        raise SettingError("allow_requantize", f"{in_file} is already quantized (file type {file_type}), and "
                           "requantizing loses quality: it must be allowed explicitly")
    library_version()
    if imatrix is not None:
        load_imatrix(imatrix)  # refused here, as invalid input, rather than in the child
    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out_file)
    command = [sys.executable, "-m", "so8t_deploy.external.quantize_runner", str(in_file), str(staging),
               str(quant.ftype), "--threads", str(threads or os.cpu_count() or 1)]
    command += ["--imatrix", str(imatrix)] if imatrix is not None else []
    for key, value in (metadata or {}).items():
        if len(key) > KV_VALUE_MAX or len(str(value).encode()) > KV_VALUE_MAX:
            raise BuildError(f"internal: metadata {key} does not fit llama.cpp's {KV_VALUE_MAX}-byte override")
        command += ["--kv", f"{key}={'int' if isinstance(value, int) else 'str'}:{value}"]
    command += ["--allow-requantize"] if allow_requantize else []

    def follow(line: str) -> None:
        if (progress := progress_of(line)) is not None:
            if on_progress:
                on_progress(*progress)
        elif line.strip():
            LOGGER.debug(line)

    try:
        rc, log = run_child(command, follow, env={"TMPDIR": str(out_file.parent)})
        if rc != 0 or not staging.is_file():
            raise BuildError(f"{in_file}: llama_model_quantize to {quant.name} failed (exit {rc}): {last_lines(log)}")
        publish_file(staging, out_file)
    finally:
        staging.unlink(missing_ok=True)


def _open_for_logits(path: Path, n_ctx: int) -> Llama:
    library_version()
    import llama_cpp

    route_llama_log()
    f32 = 0  # GGML_TYPE_F32
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, type_k=f32, type_v=f32,
                           n_threads=os.cpu_count() or 1)


def gguf_window_logits(path: Path, windows: list[list[int]]) -> list[np.ndarray]:
    """Logits for every position of each token window, from llama.cpp itself (numpy arrays).

    The model is loaded once. The KV cache is kept in f32: llama.cpp's default f16 cache alone
    moves logits by ~1e-3, which would hide what a comparison with a reference is meant to find.
    """
    import numpy as np

    llm = _open_for_logits(path, max(512, *(len(w) for w in windows)))
    try:
        out = []
        for window in windows:
            llm.reset()
            llm.eval(window)
            out.append(np.array(llm.scores[: len(window)], dtype=np.float64))
        return out
    finally:
        llm.close()


def gguf_logits(path: Path, token_ids: list[int]) -> np.ndarray:
    """Logits for every position of token_ids (see gguf_window_logits)."""
    return gguf_window_logits(path, [token_ids])[0]


def gguf_tokenize(path: Path, text: str) -> list[int]:
    """The GGUF's own tokenizer (vocab only: no weights are loaded)."""
    library_version()
    import llama_cpp

    route_llama_log()
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False)
    finally:
        llm.close()


def gguf_generation_speed(path: Path, prompt_tokens: list[int], n_tokens: int = 64, warmup: int = 4) -> float:
    """Greedy generation speed on this machine, in tokens per second (after a few warm-up tokens)."""
    import time

    llm = _open_for_logits(path, 512)
    try:
        llm.eval(prompt_tokens)
        for _ in range(warmup):
            _eval_greedy_token(llm)
        started = time.perf_counter()
        for _ in range(n_tokens):
            _eval_greedy_token(llm)
        return n_tokens / (time.perf_counter() - started)
    finally:
        llm.close()


def _eval_greedy_token(llm: Llama) -> None:
    """Feed back the most likely next token."""
    llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
