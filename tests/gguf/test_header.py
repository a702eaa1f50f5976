"""The GGUF pre-validator: real files parse to the numbers llama.cpp reports, and every
bad file (truncated, corrupt, hostile) gets ModelInvalid and nothing else."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeld.errors import ModelInvalid
from modeld.gguf import GgufHeader, read_gguf_header
from modeld.gguf._ggml_types import GGML_TYPES
from tests.support.gguf_bytes import (
    ARR,
    F32,
    I8,
    I32,
    STR,
    U8,
    U32,
    U64,
    GgufSpec,
    Tensor,
    base_spec,
    build_gguf,
    enc_value,
    rewrite_gguf,
    write,
)
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf


def expect_invalid(path: Path, match: str, **kwargs: int) -> ModelInvalid:
    with pytest.raises(ModelInvalid, match=match) as info:
        read_gguf_header(path, **kwargs)
    assert path.name in str(info.value)
    return info.value


# --- real files -----------------------------------------------------------------------


def test_ggml_type_table_matches_gguf_py() -> None:
    expected = {int(t): sizes for t, sizes in gguf.constants.GGML_QUANT_SIZES.items()}
    actual = {code: (t.block_elements, t.block_bytes) for code, t in GGML_TYPES.items()}
    assert actual == expected
    assert all(GGML_TYPES[code].name == gguf.GGMLQuantizationType(code).name for code in GGML_TYPES)


_LLAMA_NUMBERS = """
import json, sys
import llama_cpp
llama = llama_cpp.Llama(sys.argv[1], n_ctx=256, verbose=False)
model = llama.model
print(json.dumps({
    "n_ctx_train": llama._model.n_ctx_train(), "n_embd": llama.n_embd(),
    "n_vocab": llama.n_vocab(),
    "model_size": llama_cpp.llama_model_size(model),
    "n_layer": llama_cpp.llama_model_n_layer(model), "n_head": llama_cpp.llama_model_n_head(model),
    "n_head_kv": llama_cpp.llama_model_n_head_kv(model),
}))
llama.close()
"""


def llama_numbers(path: Path) -> dict[str, int]:
    """What llama.cpp itself reports for ``path`` (in a subprocess: a bad file may abort)."""
    import json

    result = subprocess.run(
        [sys.executable, "-c", _LLAMA_NUMBERS, str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    numbers: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    return numbers


def assert_matches_llama(header: GgufHeader) -> None:
    numbers = llama_numbers(header.path)
    assert header.context_length == numbers["n_ctx_train"]
    assert header.embedding_length == numbers["n_embd"]
    assert header.n_vocab == numbers["n_vocab"]
    assert header.total_weight_bytes == numbers["model_size"]
    assert header.block_count == numbers["n_layer"]
    assert header.head_count == numbers["n_head"]
    assert header.head_count_kv == numbers["n_head_kv"]


@pytest.mark.parametrize(
    "spec",
    [TinyModelSpec(), TinyModelSpec(n_embd=256, n_layer=6, n_head=8, n_head_kv=2, n_ff=512)],
    ids=["default", "gqa"],
)
def test_tiny_model_matches_llama_cpp(tmp_path: Path, spec: TinyModelSpec) -> None:
    header = read_gguf_header(write_tiny_gguf(tmp_path / "tiny.gguf", spec))
    assert header.architecture == "llama"
    assert header.name == "tiny"
    assert header.version == 3
    assert header.key_length == header.value_length == spec.n_embd // spec.n_head
    assert header.feed_forward_length == spec.n_ff
    assert header.file_size_bytes == header.path.stat().st_size
    assert not header.tied_embeddings
    assert len(header.layer_weight_bytes) == spec.n_layer
    assert sum(header.layer_weight_bytes) + header.input_weight_bytes + (
        header.output_weight_bytes
    ) == (header.total_weight_bytes)
    assert_matches_llama(header)


@pytest.mark.slow
def test_gemma_matches_llama_cpp(gemma_path: Path) -> None:
    header = read_gguf_header(gemma_path)
    assert (header.architecture, header.block_count, header.n_vocab) == ("gemma3", 18, 262144)
    assert (header.key_length, header.value_length, header.sliding_window) == (256, 256, 512)
    assert header.tied_embeddings  # no output.weight: llama.cpp reuses token_embd
    assert_matches_llama(header)


def test_tensor_table(tmp_path: Path) -> None:
    header = read_gguf_header(write(tmp_path / "base.gguf", build_gguf(base_spec())))
    by_name = {tensor.name: tensor for tensor in header.tensors}
    q8 = by_name["blk.1.ffn_up.weight"]
    assert (q8.ggml_type_name, q8.shape, q8.nbytes) == ("Q8_0", (32, 64), 64 * 34)
    assert all(t.file_offset_bytes % 32 == 0 for t in header.tensors)
    norms, q_and_o, k_and_v = 2 * 32 * 4, 2 * 32 * 32 * 4, 2 * 32 * 16 * 4
    gate_and_down, up_q8 = 2 * 32 * 64 * 4, 64 * 34
    assert header.layer_weight_bytes == (norms + q_and_o + k_and_v + gate_and_down + up_q8,) * 2
    assert header.output_weight_bytes == 32 * 4 + 32 * 8 * 2
    assert header.input_weight_bytes == 32 * 8 * 4
    assert (header.head_count, header.head_count_kv, header.key_length) == (4, 2, 8)


def test_per_layer_head_counts(tmp_path: Path) -> None:
    # llama.cpp sizes every llama layer's K and V by layer 0's count: 2, as base_spec's tensors
    spec = base_spec().set("llama.attention.head_count_kv", ARR, (I32, [2, 1]))
    header = read_gguf_header(write(tmp_path / "m.gguf", build_gguf(spec)))
    assert header.head_count_kv_per_layer == (2, 1)
    assert header.head_count_kv == 2
    spec.set("llama.attention.head_count_kv", ARR, (I32, [1, 2, 2]))
    expect_invalid(write(tmp_path / "m.gguf", build_gguf(spec)), "one per layer")


def test_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    target = write(tmp_path / "real.gguf", build_gguf(base_spec()))
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    assert read_gguf_header(link).block_count == 2


# --- hostile and broken headers ----------------------------------------------------------


def with_kv(key: str, value_type: int, value: object) -> Callable[[], bytes]:
    return lambda: build_gguf(base_spec().set(key, value_type, value))


def without_kv(key: str) -> Callable[[], bytes]:
    def make() -> bytes:
        spec = base_spec()
        del spec.kv[key]
        return build_gguf(spec)

    return make


def with_spec(change: Callable[[GgufSpec], object]) -> Callable[[], bytes]:
    def make() -> bytes:
        spec = base_spec()
        change(spec)
        return build_gguf(spec)

    return make


def with_tensor(tensor: Tensor) -> Callable[[], bytes]:
    return with_spec(lambda spec: spec.tensors.append(tensor))


def patched(offset: int, data: bytes) -> Callable[[], bytes]:
    def make() -> bytes:
        raw = bytearray(build_gguf(base_spec()))
        raw[offset : offset + len(data)] = data
        return bytes(raw)

    return make


def huge_string_value() -> bytes:
    """A string value whose declared length is 2^50, in a small file."""
    spec = base_spec()
    spec.kv["general.name"] = struct.pack("<IQ", STR, 1 << 50) + b"abc"
    return build_gguf(spec)


def huge_array(element_type: int) -> Callable[[], bytes]:
    def make() -> bytes:
        spec = base_spec()
        spec.kv["general.tags"] = struct.pack("<IIQ", ARR, element_type, 1 << 50) + b"\0" * 16
        return build_gguf(spec)

    return make


def duplicate_key(spec: GgufSpec) -> None:
    spec.extra_kv.append((b"llama.block_count", enc_value(U32, 2)))


def empty_key(spec: GgufSpec) -> None:
    spec.extra_kv.append((b"", enc_value(U32, 2)))


def misalign_first_tensor(spec: GgufSpec) -> None:
    spec.tensors[0].offset = 4


def misplace_last_tensor(spec: GgufSpec) -> None:
    spec.tensors.append(Tensor("extra.weight", (8,), 0, offset=1 << 40))


def long_tensor_name(spec: GgufSpec) -> None:
    spec.tensors.append(Tensor("x" * 64, (8,)))


def duplicate_tensor(spec: GgufSpec) -> None:
    spec.tensors.append(Tensor("output.weight", (8,)))


def no_tensors(spec: GgufSpec) -> None:
    spec.tensors.clear()


def overlapping_tensors(spec: GgufSpec) -> None:
    spec.tensors.append(Tensor("shadow.weight", (32, 32), 0, offset=0))
    spec.tensors.append(Tensor("shadow2.weight", (32, 64), 0, offset=0))


BAD_HEADERS: dict[str, tuple[Callable[[], bytes], str]] = {
    "wrong magic": (patched(0, b"GGUG"), "not a GGUF file"),
    "version 1": (patched(4, struct.pack("<I", 1)), "unsupported GGUF version 1"),
    "version 4": (patched(4, struct.pack("<I", 4)), "unsupported GGUF version 4"),
    "big endian": (patched(4, struct.pack(">I", 3)), "byte order"),
    "n_tensors 2^40": (patched(8, struct.pack("<Q", 1 << 40)), "tensor count 1099511627776"),
    "n_kv 2^40": (patched(16, struct.pack("<Q", 1 << 40)), "metadata count 1099511627776"),
    "n_kv beyond the file": (with_spec(lambda s: setattr(s, "n_kv", 5000)), "metadata count"),
    "n_kv too small": (with_spec(lambda s: setattr(s, "n_kv", 3)), "tensor"),
    "key length 2^50": (patched(24, struct.pack("<Q", 1 << 50)), "key #0 is 1125899906842624"),
    "string length 2^50": (huge_string_value, "general.name.*1125899906842624 bytes long"),
    "array count 2^50": (huge_array(U32), "declares 1125899906842624 elements"),
    "string array count 2^50": (huge_array(STR), "declares 1125899906842624 strings"),
    "array of arrays": (huge_array(ARR), "array of arrays"),
    "array of unknown type": (huge_array(13), "unknown value type 13"),
    "value type 13": (with_spec(lambda s: s.kv.update(x=struct.pack("<I", 13))), "type 13"),
    "duplicate key": (with_spec(duplicate_key), "duplicate metadata key 'llama.block_count'"),
    "empty key": (with_spec(empty_key), "is empty"),
    "non-UTF-8 key": (with_spec(lambda s: s.extra_kv.append((b"\xff", b""))), "not UTF-8"),
    "alignment 0": (with_kv("general.alignment", U32, 0), "power of two"),
    "alignment 48": (with_kv("general.alignment", U32, 48), "power of two"),
    "alignment 2^21": (with_kv("general.alignment", U32, 1 << 21), "power of two"),
    "alignment u64": (with_kv("general.alignment", U64, 32), "must be a uint32"),
    "no architecture": (without_kv("general.architecture"), "general.architecture"),
    "architecture u32": (with_kv("general.architecture", U32, 1), "must be a string"),
    "architecture odd": (with_kv("general.architecture", STR, "../x"), "not a valid name"),
    "no block_count": (without_kv("llama.block_count"), "missing.*llama.block_count"),
    "block_count 0": (with_kv("llama.block_count", U32, 0), "block_count = 0"),
    "block_count 600": (with_kv("llama.block_count", U32, 600), "block_count = 600"),
    "block_count 100000": (with_kv("llama.block_count", U32, 100000), "block_count = 100000"),
    "block_count -1": (with_kv("llama.block_count", I32, -1), "block_count = -1"),
    "block_count string": (with_kv("llama.block_count", STR, "2"), "must be an integer"),
    "context_length 2^31-1": (with_kv("llama.context_length", U32, 2**31 - 1), "2147483647"),
    "context_length 0": (with_kv("llama.context_length", U32, 0), "context_length = 0"),
    "embedding_length 0": (with_kv("llama.embedding_length", U32, 0), "embedding_length"),
    "embedding_length 2^32-1": (with_kv("llama.embedding_length", U32, 2**32 - 1), "embedding"),
    "head_count 0": (with_kv("llama.attention.head_count", U32, 0), "head_count = 0"),
    "head_count 2^20": (with_kv("llama.attention.head_count", U32, 1 << 20), "head_count"),
    "head_count_kv 3": (with_kv("llama.attention.head_count_kv", U32, 3), "not a multiple"),
    "head_count_kv > head_count": (with_kv("llama.attention.head_count_kv", U32, 8), "multiple"),
    "head_count 3 no key_length": (with_kv("llama.attention.head_count", U32, 3), "multiple"),
    "key_length 2^20": (with_kv("llama.attention.key_length", U32, 1 << 20), "key_length"),
    "feed_forward 0": (with_kv("llama.feed_forward_length", U32, 0), "feed_forward_length"),
    "feed_forward 2^40": (with_kv("llama.feed_forward_length", U64, 1 << 40), "feed_forward"),
    "expert_count 1000": (with_kv("llama.expert_count", U32, 1000), "expert_count = 1000"),
    "experts without used": (with_kv("llama.expert_count", U32, 4), "both be zero"),
    "used without experts": (with_kv("llama.expert_used_count", U32, 2), "expert_used_count"),
    "no tokens": (without_kv("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens"),
    "tokens not strings": (with_kv("tokenizer.ggml.tokens", ARR, (I32, [1])), "array of STRING"),
    "scores wrong type": (with_kv("tokenizer.ggml.scores", ARR, (I8, [0] * 8)), "FLOAT32"),
    "scores short": (with_kv("tokenizer.ggml.scores", ARR, (F32, [0.0] * 7)), "7 entries"),
    "token_type long": (with_kv("tokenizer.ggml.token_type", ARR, (I32, [1] * 9)), "9 entries"),
    "merges not strings": (with_kv("tokenizer.ggml.merges", ARR, (U8, [1])), "merges"),
    "bos id = n_vocab": (with_kv("tokenizer.ggml.bos_token_id", U32, 8), "bos_token_id = 8"),
    "eot id 2^31": (with_kv("tokenizer.ggml.eot_token_id", U32, 2**31), "eot_token_id"),
    "pad id -5": (with_kv("tokenizer.ggml.padding_token_id", I32, -5), "padding_token_id"),
    "chat template 1 MiB+1": (
        with_kv("tokenizer.chat_template", STR, "x" * ((1 << 20) + 1)),
        "1048577 bytes long",
    ),
    "no tensors": (with_spec(no_tensors), "no tensors"),
    "misaligned offset": (with_spec(misalign_first_tensor), "not aligned to 32"),
    "offset 2^40": (with_spec(misplace_last_tensor), "runs past"),
    "overlapping total": (with_spec(overlapping_tensors), "more than"),
    "tensor name 64 bytes": (with_spec(long_tensor_name), "64 bytes long"),
    "duplicate tensor": (with_spec(duplicate_tensor), "duplicate tensor name"),
    "dims 0": (with_tensor(Tensor("zero.weight", (8, 0))), "zero dimension"),
    "n_dims 5": (with_tensor(Tensor("five.weight", (1, 1, 1, 1, 1))), "5 dimensions"),
    "n_dims 0": (with_tensor(Tensor("none.weight", ())), "0 dimensions"),
    "elements 2^62": (with_tensor(Tensor("big.weight", (1 << 31, 1 << 31))), "too many"),
    "ggml type 4 (removed)": (with_tensor(Tensor("old.weight", (32,), 4)), "unknown ggml type 4"),
    "ggml type 99": (with_tensor(Tensor("new.weight", (32,), 99)), "unknown ggml type 99"),
    "row not a block multiple": (with_tensor(Tensor("q.weight", (33,), 8)), "block size 32"),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_bad_header_is_rejected(tmp_path: Path, name: str) -> None:
    make, match = BAD_HEADERS[name]
    expect_invalid(write(tmp_path / "bad.gguf", make()), match)


def test_context_length_limit_is_configurable(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", build_gguf(base_spec()))
    expect_invalid(path, "context_length = 256 is out of range 1..255", max_context_length=255)
    assert read_gguf_header(path, max_context_length=256).context_length == 256


def test_special_token_sentinels_mean_none(tmp_path: Path) -> None:
    spec = base_spec().set("tokenizer.ggml.padding_token_id", I32, -1)
    spec.set("tokenizer.ggml.sep_token_id", U32, 0xFFFF_FFFF)
    assert read_gguf_header(write(tmp_path / "m.gguf", build_gguf(spec))).n_vocab == 8


def test_data_section_cut_short(tmp_path: Path) -> None:
    data = build_gguf(base_spec())
    expect_invalid(write(tmp_path / "cut.gguf", data[:-1]), "runs past")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "truncated: the magic"),
        (b"GGUF", "truncated: the version"),
        (b"GGUF\x03\0\0\0", "truncated: the tensor count"),
        (b"hello, I am a text file\n" * 10, "not a GGUF file"),
    ],
    ids=["empty", "magic only", "no counts", "text"],
)
def test_small_files(tmp_path: Path, content: bytes, match: str) -> None:
    expect_invalid(write(tmp_path / "small.gguf", content), match)


def test_directory_fifo_and_missing_file(tmp_path: Path) -> None:
    directory = tmp_path / "dir.gguf"
    directory.mkdir()
    expect_invalid(directory, "not a regular file")
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)  # opening must not block waiting for a writer
    expect_invalid(fifo, "not a regular file")
    expect_invalid(tmp_path / "missing.gguf", "cannot open")
    expect_invalid(Path("/dev/null"), "not a regular file")


def test_tiny_model_truncated_anywhere(tiny_model_path: Path, tmp_path: Path) -> None:
    data = tiny_model_path.read_bytes()
    header = read_gguf_header(tiny_model_path)
    cut_points = set(range(0, header.data_offset_bytes + 64, 7))
    cut_points |= {len(data) - 1, len(data) - 4096, header.data_offset_bytes + 1000}
    target = tmp_path / "cut.gguf"
    for cut in sorted(cut_points):
        target.write_bytes(data[:cut])
        with pytest.raises(ModelInvalid):
            read_gguf_header(target)


# --- fuzzing: whatever the bytes, a header or ModelInvalid ------------------------------


class Mutation:
    """One change to a file's bytes, at a position clamped to the file."""

    def __init__(self, kind: str, position: int, blob: bytes) -> None:
        self.kind, self.position, self.blob = kind, position, blob

    def __repr__(self) -> str:
        return f"Mutation({self.kind!r}, {self.position}, {self.blob!r})"

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        at = min(self.position, len(data) - 1)
        if self.kind == "truncate":
            return data[:at]
        if self.kind == "flip":
            return data[:at] + bytes([data[at] ^ self.blob[0]]) + data[at + 1 :]
        return data[:at] + self.blob + data[at + len(self.blob) :]


_HUGE = [0, 2**31 - 1, 2**32 - 1, 2**40, 2**50, 2**63, 2**64 - 1]
_POSITIONS = st.integers(0, 9000)  # the n_layer=1 tiny model's header is about 8 KB
MUTATIONS = st.one_of(
    st.builds(Mutation, st.just("truncate"), _POSITIONS, st.just(b"")),
    st.builds(
        Mutation, st.just("flip"), _POSITIONS, st.sampled_from([bytes([1 << b]) for b in range(8)])
    ),
    st.builds(Mutation, st.just("overwrite"), _POSITIONS, st.binary(min_size=1, max_size=16)),
    st.builds(
        Mutation,
        st.just("overwrite"),
        _POSITIONS,
        st.sampled_from(_HUGE).map(lambda v: struct.pack("<Q", v)),
    ),
)


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_tiny_gguf(tmp_path_factory.mktemp("fuzz") / "seed.gguf", TinyModelSpec(n_layer=1))
    return path.read_bytes()


@settings(max_examples=300, deadline=None)
@given(changes=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_mutated_model_gives_header_or_model_invalid(
    changes: list[Mutation], fuzz_seed: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    blob = fuzz_seed
    for change in changes:
        blob = change.apply(blob)
    target = tmp_path_factory.getbasetemp() / "fuzz-target.gguf"
    target.write_bytes(blob)
    try:
        header = read_gguf_header(target)
    except ModelInvalid:
        return
    assert header.data_offset_bytes + header.total_weight_bytes <= header.file_size_bytes
    assert 1 <= header.block_count <= 512


# --- why this exists: llama.cpp aborts the process on these -----------------------------

_LOAD = textwrap.dedent(
    """
    import sys, llama_cpp
    try:
        llama_cpp.Llama(sys.argv[1], n_ctx=128, verbose=False)
    except ValueError:
        sys.exit(3)
    """
)


@pytest.mark.parametrize(
    "kv",
    [
        {"llama.block_count": enc_value(U32, 600)},
        {"llama.expert_count": enc_value(U32, 4)},  # experts but no expert_used_count
    ],
    ids=["block_count 600", "experts without used"],
)
def test_files_that_abort_llama_cpp_are_rejected_first(
    tiny_model_path: Path, tmp_path: Path, kv: dict[str, bytes]
) -> None:
    bad = rewrite_gguf(tiny_model_path, tmp_path / "bad.gguf", set_kv=kv)
    with pytest.raises(ModelInvalid):
        read_gguf_header(bad)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD, str(bad)], capture_output=True, timeout=120, check=False
    )
    assert result.returncode < 0  # killed by SIGABRT: the reason for the pre-validator


def test_rewrite_helper_keeps_a_loadable_model(tiny_model_path: Path, tmp_path: Path) -> None:
    same = rewrite_gguf(tiny_model_path, tmp_path / "same.gguf")
    assert read_gguf_header(same).total_weight_bytes == (
        read_gguf_header(tiny_model_path).total_weight_bytes
    )
    result = subprocess.run(
        [sys.executable, "-c", _LOAD, str(same)], capture_output=True, timeout=120, check=False
    )
    assert result.returncode == 0
