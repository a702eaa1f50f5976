"""``read_gguf_metadata``: values for display, never a large array, a cheap digest that
follows the content, and the same refusals as the header reader for a broken file."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import pytest

from modeld.errors import ModelInvalid
from modeld.gguf import read_gguf_metadata
from modeld.gguf._metadata import _FILE_TYPES, MAX_ARRAY_ELEMENTS
from tests.support.gguf_bytes import (
    ARR,
    BOOL,
    F32,
    I32,
    STR,
    U32,
    base_spec,
    build_gguf,
    write,
)


def test_file_type_names_match_gguf_py() -> None:
    known = {member.value: member.name for member in gguf.LlamaFileType}
    for value, name in _FILE_TYPES.items():
        assert known[value].removeprefix("MOSTLY_").removeprefix("ALL_") == name


def test_values_and_details(tmp_path: Path) -> None:
    spec = base_spec(n_vocab=MAX_ARRAY_ELEMENTS + 1)
    spec.set("general.file_type", U32, 7).set("general.flag", BOOL, 1)
    spec.set("llama.rope.freq_base", F32, 10000.0).set("llama.norm_eps", F32, 1e-6)
    spec.set("general.tags", ARR, (STR, ["a", "ü"])).set("llama.sections", ARR, (I32, [1, -2]))
    metadata = read_gguf_metadata(write(tmp_path / "m.gguf", build_gguf(spec)))
    values = metadata.values
    assert values["general.architecture"] == "llama"
    assert values["llama.context_length"] == 256
    assert values["general.flag"] is True
    assert values["llama.norm_eps"] == 1e-6  # the float32, printed shortest
    assert values["general.tags"] == ["a", "ü"]
    assert values["llama.sections"] == [1, -2]
    assert values["tokenizer.ggml.tokens"] is None  # 65 entries: not listed
    assert metadata.architecture == "llama"
    assert metadata.quantization == "Q8_0"
    assert metadata.parameter_count == sum(math.prod(t.shape) for t in spec.tensors)


def test_quantization_without_a_file_type_is_the_heaviest_tensor_type(tmp_path: Path) -> None:
    metadata = read_gguf_metadata(write(tmp_path / "m.gguf", build_gguf(base_spec())))
    assert metadata.quantization == "F32"  # the F32 tensors hold the most bytes


def test_the_digest_follows_the_content(tmp_path: Path) -> None:
    data = build_gguf(base_spec())
    first = read_gguf_metadata(write(tmp_path / "a.gguf", data)).digest
    assert read_gguf_metadata(write(tmp_path / "b.gguf", data)).digest == first  # not the name
    changed = bytearray(data)
    changed[-1] ^= 0xFF  # the last byte of tensor data
    assert read_gguf_metadata(write(tmp_path / "c.gguf", bytes(changed))).digest != first


@pytest.mark.parametrize("cut", [3, 40, 200])
def test_a_broken_file_is_refused(tmp_path: Path, cut: int) -> None:
    path = write(tmp_path / "m.gguf", build_gguf(base_spec())[:cut])
    with pytest.raises(ModelInvalid):
        read_gguf_metadata(path)
    with pytest.raises(ModelInvalid, match="not a regular file"):
        read_gguf_metadata(tmp_path)


def test_the_real_gemma(gemma_path: Path) -> None:
    metadata = read_gguf_metadata(gemma_path)
    assert metadata.architecture == "gemma3"
    assert metadata.quantization == "Q4_K_M"
    assert metadata.values["gemma3.attention.layer_norm_rms_epsilon"] == 1e-6
    assert metadata.values["tokenizer.ggml.tokens"] is None
    assert 260_000_000 < metadata.parameter_count < 280_000_000
