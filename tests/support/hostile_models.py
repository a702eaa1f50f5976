"""Hostile and broken model files that pass the old header checks, each a tiny llama
model with one thing wrong; what raw llama.cpp does with each is measured by
``tests/gguf/test_hostile_models.py`` and listed in ``docs/bad-inputs.md``."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import gguf

from tests.support.gguf_bytes import U32, enc_value, rewrite_gguf
from tests.support.tiny_gguf import TinyModelSpec, tiny_vocab, write_tiny_gguf

__all__ = [
    "HOSTILE_MODELS",
    "PROBE_ONLY_MODELS",
    "hostile_charsmap",
    "point_tensor_at",
    "write_hostile",
]

_NORMAL, _BYTE = 1, 6
_BYTE_BC = 3 + 0xBC  # the index of <0xBC> in the tiny vocabulary


def _vocab_with(index: int, text: str, token_type: int | None = None) -> TinyModelSpec:
    tokens, types = tiny_vocab()
    tokens[index] = text
    if token_type is not None:
        types[index] = token_type
    return TinyModelSpec(vocab=(tuple(tokens), tuple(types)))


def _three_tokens() -> TinyModelSpec:
    return TinyModelSpec(vocab=(("<unk>", "<s>", "</s>"), (2, 3, 3)))


def _duplicate_token() -> TinyModelSpec:
    tokens, types = tiny_vocab()
    tokens[-1] = tokens[-2]
    return TinyModelSpec(vocab=(tuple(tokens), tuple(types)))


def _wpm_with_byte_tokens() -> TinyModelSpec:
    return TinyModelSpec(tokenizer_model="bert")


def hostile_charsmap() -> bytes:
    """A T5 normalisation table (XCDA) of 128 empty nodes: any byte of 0x80 or above
    indexes past its end, and llama.cpp throws from inside ``llama_tokenize``."""
    nodes = 128
    return struct.pack("<I", 4 * nodes) + b"\0" * (4 * nodes) + b"\0"


def _hostile_t5() -> TinyModelSpec:
    return TinyModelSpec(tokenizer_model="t5", precompiled_charsmap=hostile_charsmap())


def point_tensor_at(path: Path, name: str, other: str) -> Path:
    """Rewrite ``name``'s data offset to ``other``'s in place: the two overlap."""
    reader = gguf.GGUFReader(str(path))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    target_offset = int(tensors[other].field.parts[-1][0])
    field = tensors[name].field
    position = field.offset + sum(part.nbytes for part in field.parts[:-1])
    del reader
    with path.open("r+b") as handle:
        handle.seek(position)
        handle.write(struct.pack("<Q", target_offset))
    return path


def _write(spec: TinyModelSpec) -> Callable[[Path], Path]:
    return lambda path: write_tiny_gguf(path, spec)


def _overlapping(path: Path) -> Path:
    write_tiny_gguf(path, TinyModelSpec())
    return point_tensor_at(path, "blk.1.attn_v.weight", "blk.1.attn_k.weight")


def _split_part(path: Path) -> Path:
    plain = write_tiny_gguf(path.with_suffix(".plain"), TinyModelSpec())
    rewrite_gguf(plain, path, set_kv={"split.count": enc_value(U32, 2)})
    plain.unlink()
    return path


# name -> (writer, what raw llama.cpp 0.3.36 does with it: "abort" or "refuse")
HOSTILE_MODELS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "spm-three-tokens": (_write(_three_tokens()), "abort"),
    "spm-byte-token-renamed": (_write(_vocab_with(_BYTE_BC, "zz", _NORMAL)), "abort"),
    "spm-byte-token-lower-case": (_write(_vocab_with(_BYTE_BC, "<0xbc>")), "abort"),
    "spm-byte-token-text-AB": (_write(_vocab_with(3 + 0x41, "AB")), "refuse"),
    "spm-duplicate-token": (_write(_duplicate_token()), "abort"),
    "wpm-byte-tokens": (_write(_wpm_with_byte_tokens()), "abort"),
    "tensor-missing": (
        _write(TinyModelSpec(omit_tensors=frozenset({"blk.1.attn_k.weight"}))),
        "refuse",
    ),
    "tensor-wrong-shape": (
        _write(TinyModelSpec(tensor_shapes=(("blk.0.ffn_up.weight", (128, 32)),))),
        "refuse",
    ),
    "tensor-overlap": (_overlapping, "load"),
    "split-part": (_split_part, "refuse"),
}
# Pass every static check; abort only when a prompt holds a byte of 0x80 or above.
PROBE_ONLY_MODELS: dict[str, Callable[[Path], Path]] = {
    "t5-hostile-charsmap": _write(_hostile_t5()),
}


def write_hostile(directory: Path, name: str) -> Path:
    writer = HOSTILE_MODELS[name][0] if name in HOSTILE_MODELS else PROBE_ONLY_MODELS[name]
    return writer(directory / f"{name}.gguf")
