"""Run llama.cpp's own convert_hf_to_gguf.py with extra GGUF metadata keys.

Executed in a child process that dies with its parent (see child.py):
``python -m so8t_deploy.external.convert_runner CONVERTER_DIR METADATA_JSON -- ARGS``.
The converter has no option for arbitrary keys (its --metadata file only overrides
general.* authorship fields), so this adds the so8t.* provenance keys to every GGUFWriter
just before it writes its header; the converter itself runs unmodified.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

from .child import die_with_parent


def main(argv: list[str]) -> None:
    die_with_parent()
    converter_dir, metadata_path, separator, *converter_args = argv
    if separator != "--":
        raise SystemExit("usage: convert_runner.py CONVERTER_DIR METADATA_JSON -- CONVERTER_ARGS")
    root = Path(converter_dir)
    # The vendored gguf-py must win over any installed gguf: it matches this converter.
    sys.path[:0] = [str(root / "gguf-py"), str(root)]
    import gguf

    metadata: dict[str, str] = json.loads(Path(metadata_path).read_text(encoding="utf-8"))
    write_header = gguf.GGUFWriter.write_header_to_file

    def write_header_with_provenance(self: Any, *args: Any, **kwargs: Any) -> None:  # gguf is untyped
        for key, value in metadata.items():
            if not any(key in kv for kv in self.kv_data):
                self.add_string(key, value)
        return write_header(self, *args, **kwargs)

    # Patch the class, not an instance: the converter has no hook and creates its writers itself.
    # setattr because mypy rightly refuses assignments to a method; here replacing it is the point.
    setattr(gguf.GGUFWriter, "write_header_to_file", write_header_with_provenance)  # noqa: B010
    sys.argv = [str(root / "convert_hf_to_gguf.py"), *converter_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
