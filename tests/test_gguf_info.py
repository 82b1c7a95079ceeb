"""read_gguf_info reads only the header: what it says agrees with gguf's own reader (which builds every array),
on files of either byte order with vocabulary-sized string arrays and nested arrays, and a damaged header or a
tensor that ends past the file is a ModelError naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter

from so8t_deploy.errors import ModelError
from so8t_deploy.external.gguf_info import read_gguf_info


def write_gguf(path: Path, endianess: GGUFEndian = GGUFEndian.LITTLE) -> Path:
    writer = GGUFWriter(path, "llama", endianess=endianess)
    writer.add_file_type(7)
    writer.add_string("so8t.variant", "full")
    writer.add_string("so8t.source_model", "örg/módel")  # not ASCII
    writer.add_token_list([f"tok{i}" for i in range(5000)])  # an array of strings, skipped
    writer.add_token_scores([0.5] * 5000)  # an array of numbers, skipped
    writer.add_key_value("test.nested", [[1, 2], [3]], GGUFValueType.ARRAY, sub_type=GGUFValueType.ARRAY)
    writer.add_bool("test.flag", True)
    writer.add_float32("test.ratio", 0.25)
    writer.add_tensor("a", np.ones((4, 32), dtype=np.float32))
    writer.add_tensor("b", np.ones(64, dtype=np.float16))
    writer.add_tensor("c", np.zeros((2, 34), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)  # 2x32 Q8_0
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_the_header_says_what_ggufs_own_reader_says(tmp_path, endianess):
    path = write_gguf(tmp_path / "m.gguf", endianess)
    reader = GGUFReader(path)
    info = read_gguf_info(path)
    assert (info.architecture, info.file_type, info.parts) == ("llama", 7, (path,))
    assert info.metadata == {"so8t.variant": "full", "so8t.source_model": "örg/módel"}
    assert info.n_params == sum(int(t.n_elements) for t in reader.tensors) == 4 * 32 + 64 + 64
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors) == 4 * 32 * 4 + 64 * 2 + 2 * 34


def test_a_damaged_header_is_a_model_error_naming_the_file(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    good, last = path.read_bytes(), GGUFReader(path).tensors[-1]
    cases = {
        "empty": b"",
        "no magic": b"GGML" + good[4:],
        "version 1": good[:4] + (1).to_bytes(4, "little") + good[8:],
        "header cut": good[:200],
        "tensor data cut": good[:last.data_offset + last.n_bytes - 1],  # one byte short of the last tensor
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(ModelError, match=rf"^{path}: not a readable GGUF file \(.+\)$"):
            read_gguf_info(path)
    with pytest.raises(ModelError, match="no GGUF magic"):
        read_gguf_info(tmp_path / "no magic.gguf")
    with pytest.raises(ModelError, match="GGUF version 1; llama.cpp reads 2 and 3"):
        read_gguf_info(tmp_path / "version 1.gguf")
    with pytest.raises(ModelError, match="tensor 'c' ends past the end of the file"):
        read_gguf_info(tmp_path / "tensor data cut.gguf")
