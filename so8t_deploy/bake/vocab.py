"""A resized vocabulary: which tokenizer the baked model ships, and whether it covers the new rows.

An adapter trained after `resize_token_embeddings` saves the resized embedding (and the
trainer usually saves its tokenizer beside it). The baked model then needs that
tokenizer: with the base's, the new rows could never be reached, and llama.cpp's
converter would write a vocabulary that disagrees with the embedding matrix.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError
from .lora_adapter import TOKENIZER_FILES, LoraAdapter


def tokenizer_size(directory: Path) -> int:
    """len(tokenizer): what `resize_token_embeddings(len(tokenizer))` was given when the tokens were added."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    try:
        return len(transformers.AutoTokenizer.from_pretrained(directory))
    except Exception as e:  # tokenizers raise many kinds; all mean "no usable tokenizer here"
        raise AdapterError(f"{directory}: cannot load its tokenizer: {type(e).__name__}: {e}") from e


def tokenizer_for(adapter: LoraAdapter | None, model_dir: Path, base_rows: int, rows: int) -> list[Path]:
    """The adapter tokenizer files the baked model ships instead of the base's (none: keep the base's).

    Refuses a tokenizer that leaves the new rows unreachable or names tokens past the last row.
    """
    files = adapter.tokenizer_files if adapter is not None else []
    source = adapter.path if adapter is not None and files else model_dir
    size = tokenizer_size(source)
    where = adapter.weights_file if adapter is not None else model_dir
    if rows > base_rows and size <= base_rows:
        raise AdapterError(
            f"{where}: the embeddings grow from {base_rows} to {rows} rows, but the tokenizer in {source} has "
            f"{size} tokens and reaches none of the new rows; save the tokenizer with the adapter "
            f"({', '.join(TOKENIZER_FILES[:3])}, ...)"
        )
    if size > rows:
        raise AdapterError(f"{where}: the tokenizer in {source} has {size} tokens, but the embeddings only {rows} rows")
    return files
