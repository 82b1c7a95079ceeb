"""The importance matrix's calibration data, as the model will see it: read once by the control plane.

Plain text is used as it is, tokenized like llama-imatrix does by default (special-token text stays text).
Chat data is rendered conversation by conversation through the model's own chat template (the one
`template: auto` proves every host renders byte for byte), and its special-token text is tokenized as the
special tokens a host would feed the model: the calibration then matches what the hosts serve.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..chat.model_chat import read_model_chat
from ..errors import ManifestError, ModelError
from ..jsonfile import read_bounded_text
from ..manifest.schema import Imatrix, Manifest

MAX_CALIBRATION_BYTES = 256 << 20  # llama.cpp's own calibration sets are a few MiB
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Calibration:
    text: str  # what is tokenized
    dataset: str  # the file's name: what llama-quantize records as quantize.imatrix.dataset
    parse_special: bool  # chat data: special-token text becomes the special tokens

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def load_calibration(imatrix: Imatrix, chat_dir: Path | None) -> Calibration | None:
    """The calibration text as used; None when chat data needs a chat template not on this machine yet."""
    if imatrix.text is not None:
        text = _read(imatrix.text, "quantize.imatrix.text")
        if not text.strip():
            raise ManifestError(f"quantize.imatrix.text: {imatrix.text} is empty")
        return Calibration(text, imatrix.text.name, parse_special=False)
    assert imatrix.chat is not None  # Imatrix._one_source
    if chat_dir is None:
        return None
    return Calibration(render_conversations(imatrix.chat, chat_dir), imatrix.chat.name, parse_special=True)


def render_conversations(path: Path, chat_dir: Path) -> str:
    """Every conversation of a .jsonl file, rendered by the model's chat template and concatenated."""
    where = f"quantize.imatrix.chat: {path}"
    chat = read_model_chat(chat_dir)
    if chat is None:
        raise ManifestError(f"{where}: the model has no chat template to render conversations with; use text:")
    rendered = []
    for number, line in enumerate(_read(path, "quantize.imatrix.chat").splitlines(), 1):
        if not line.strip():
            continue
        messages = _messages(line, f"{where}: line {number}")
        try:
            rendered.append(chat.render(messages, add_generation_prompt=False))
        except ModelError as e:
            raise ManifestError(f"{where}: line {number}: {e}") from None
    if not rendered:
        raise ManifestError(f"{where}: holds no conversation")
    return "".join(rendered)


def _messages(line: str, where: str) -> list[dict[str, Any]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not JSON ({e.msg})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ManifestError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str):
            raise ManifestError(f"{where}: every message needs a role ({', '.join(ROLES)}) and a string content")
    return messages


def _read(path: Path, field: str) -> str:
    return read_bounded_text(path, MAX_CALIBRATION_BYTES, f"{field} file", ManifestError)


def eval_text(manifest: Manifest) -> str:
    """The text quality is measured on: `quality.eval_text`, or the one shipped with the package."""
    path = manifest.quality.eval_text
    if path is None:
        return resources.files("so8t_deploy").joinpath("data/eval.txt").read_text(encoding="utf-8")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"quality.eval_text: cannot read {path}: {e.strerror}") from e


HELD_OUT_MIN_LINE = 20  # shorter lines (headings, blank-ish lines) may be shared by any two texts
HELD_OUT_MAX_SHARED = 0.1  # of the eval text's characters, in lines the calibration data also has


def check_held_out(text: str, calibration: Calibration | None) -> None:
    """The eval text must be held out: measuring on what the importance matrix was computed from would flatter it.

    Refused: the eval text inside the calibration text, or a tenth of it in lines the calibration text has too."""
    if calibration is None or not text.strip():
        return
    known = {line.strip() for line in calibration.text.splitlines()}
    shared = sum(len(line) for line in (raw.strip() for raw in text.splitlines())
                 if len(line) >= HELD_OUT_MIN_LINE and line in known)
    if text.strip() in calibration.text or shared >= HELD_OUT_MAX_SHARED * len(text.strip()):
        raise ManifestError(f"quality.eval_text: the text is part of the importance matrix's calibration data "
                            f"({calibration.dataset}); evaluate on held-out text")
