"""llama.cpp quantization types, by the names its `llama-quantize` tool accepts.

The numbers are llama.cpp's ``llama_ftype`` values (``general.file_type`` in a GGUF);
they are stable across llama.cpp releases because GGUF files record them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantType:
    name: str  # canonical lowercase name, as used in tags and file names
    ftype: int  # llama_ftype / general.file_type
    # llama.cpp itself refuses it without an importance matrix: llama-quant.cpp's tensor_requires_imatrix holds for
    # its default tensor type (iq1_*, iq2_*), or for the type it gives attention tensors (iq3_xs, iq3_xxs), or
    # for its q2_k tensors in a q2_k_s file. Read from the pinned llama.cpp.
    needs_imatrix: bool = False

    @property
    def is_float(self) -> bool:
        return self.name in ("f32", "f16", "bf16")

    @property
    def wants_imatrix(self) -> bool:
        """A manifest may ask for it only with an importance matrix: the IQ types (designed around one, and
        clearly worse without) and the types llama.cpp cannot make without one."""
        return self.needs_imatrix or self.name.startswith("iq")


_TYPES = [
    QuantType("f32", 0),
    QuantType("f16", 1),
    QuantType("q4_0", 2),
    QuantType("q4_1", 3),
    QuantType("q8_0", 7),
    QuantType("q5_0", 8),
    QuantType("q5_1", 9),
    QuantType("q2_k", 10),
    QuantType("q3_k_s", 11),
    QuantType("q3_k_m", 12),
    QuantType("q3_k_l", 13),
    QuantType("q4_k_s", 14),
    QuantType("q4_k_m", 15),
    QuantType("q5_k_s", 16),
    QuantType("q5_k_m", 17),
    QuantType("q6_k", 18),
    QuantType("iq2_xxs", 19, needs_imatrix=True),
    QuantType("iq2_xs", 20, needs_imatrix=True),
    QuantType("q2_k_s", 21, needs_imatrix=True),
    QuantType("iq3_xs", 22, needs_imatrix=True),
    QuantType("iq3_xxs", 23, needs_imatrix=True),
    QuantType("iq1_s", 24, needs_imatrix=True),
    QuantType("iq4_nl", 25),
    QuantType("iq3_s", 26),
    QuantType("iq3_m", 27),
    QuantType("iq2_s", 28, needs_imatrix=True),
    QuantType("iq2_m", 29, needs_imatrix=True),
    QuantType("iq4_xs", 30),
    QuantType("iq1_m", 31, needs_imatrix=True),
    QuantType("bf16", 32),
    QuantType("tq1_0", 36),
    QuantType("tq2_0", 37),
]

QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in _TYPES}


def lookup_quant_type(name: str) -> QuantType:
    """Find a type by name, case-insensitively; raise KeyError with the known names."""
    try:
        return QUANT_TYPES[name.strip().lower()]
    except KeyError:
        raise KeyError(f"unknown quant type {name!r}; known: {', '.join(QUANT_TYPES)}") from None


_SIZE_UNITS = {"M": 1000**2, "G": 1000**3}  # gguf-split's: decimal megabytes and gigabytes


def parse_split_size(text: str) -> int:
    """A size as llama.cpp's `gguf-split --split-max-size` reads it (500M, 50G), in bytes."""
    text = text.strip()
    unit, digits = text[-1:], text[:-1]
    if unit not in _SIZE_UNITS or not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"must be a positive whole number of megabytes or gigabytes, such as 500M or 50G, "
                         f"got {text!r}")
    return int(digits) * _SIZE_UNITS[unit]

