"""A byte-level GGUF writer: lets a test put any value anywhere (hostile counts, bad
types, duplicate keys), and rewrite a real model's metadata."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from modeld.gguf._ggml_types import GGML_TYPES

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_LAYOUT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f"}
_LAYOUT |= {BOOL: "<B", U64: "<Q", I64: "<q", F64: "<d"}


def enc_str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def enc_value(value_type: int, value: object) -> bytes:
    """Type tag and value, as they follow a key."""
    if value_type == STR:
        assert isinstance(value, str | bytes)
        return struct.pack("<I", STR) + enc_str(value)
    if value_type == ARR:
        assert isinstance(value, tuple)
        element_type, items = value
        body = b"".join(
            enc_str(item) if element_type == STR else struct.pack(_LAYOUT[element_type], item)
            for item in items
        )
        return struct.pack("<IIQ", ARR, element_type, len(items)) + body
    return struct.pack("<I", value_type) + struct.pack(_LAYOUT[value_type], value)


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int = 0
    offset: int | None = None  # None: packed after the previous one


@dataclass
class GgufSpec:
    kv: dict[str, bytes] = field(default_factory=dict)  # key -> enc_value(...)
    tensors: list[Tensor] = field(default_factory=list)
    version: int = 3
    alignment: int = 32
    n_tensors: int | None = None  # override the declared counts
    n_kv: int | None = None
    extra_kv: list[tuple[bytes, bytes]] = field(default_factory=list)  # raw duplicates etc.

    def set(self, key: str, value_type: int, value: object) -> GgufSpec:
        self.kv[key] = enc_value(value_type, value)
        return self


def tensor_nbytes(tensor: Tensor) -> int:
    info = GGML_TYPES[tensor.ggml_type]
    elements = 1
    for dim in tensor.shape:
        elements *= dim
    return elements // info.block_elements * info.block_bytes


def build_gguf(spec: GgufSpec) -> bytes:
    kv_items = [(key.encode(), value) for key, value in spec.kv.items()] + spec.extra_kv
    out = bytearray(b"GGUF" + struct.pack("<I", spec.version))
    n_tensors = len(spec.tensors) if spec.n_tensors is None else spec.n_tensors
    n_kv = len(kv_items) if spec.n_kv is None else spec.n_kv
    out += struct.pack("<QQ", n_tensors, n_kv)
    for key, value in kv_items:
        out += enc_str(key) + value
    offset, data_bytes = 0, 0
    for tensor in spec.tensors:
        tensor_offset = offset if tensor.offset is None else tensor.offset
        nbytes = tensor_nbytes(tensor) if tensor.ggml_type in GGML_TYPES else 0
        out += enc_str(tensor.name) + struct.pack("<I", len(tensor.shape))
        out += b"".join(struct.pack("<Q", dim) for dim in tensor.shape)
        out += struct.pack("<IQ", tensor.ggml_type, tensor_offset)
        offset = -(-(tensor_offset + nbytes) // spec.alignment) * spec.alignment
        if tensor_offset + nbytes < 1 << 24:  # hostile shapes and offsets get no data
            data_bytes = max(data_bytes, tensor_offset + nbytes)
    out += b"\0" * (-len(out) % spec.alignment)
    out += b"\x11" * data_bytes
    return bytes(out)


def base_spec(n_layer: int = 2, n_embd: int = 32, n_vocab: int = 8) -> GgufSpec:
    """A small llama-shaped file that validates: every tensor a llama layer needs, with
    its shape (4 heads of 8, 2 KV heads, feed-forward 64). Its vocabulary is a BPE
    (``gpt2``) one without merges, so llama.cpp refuses it (cleanly) at load: the
    weights are filler bytes."""
    spec = GgufSpec()
    spec.set("general.architecture", STR, "llama").set("general.name", STR, "base")
    spec.set("llama.block_count", U32, n_layer).set("llama.context_length", U32, 256)
    spec.set("llama.embedding_length", U32, n_embd).set("llama.feed_forward_length", U32, 64)
    spec.set("llama.attention.head_count", U32, 4).set("llama.attention.head_count_kv", U32, 2)
    spec.set("tokenizer.ggml.model", STR, "gpt2")
    spec.set("tokenizer.ggml.tokens", ARR, (STR, [f"t{i}" for i in range(n_vocab)]))
    spec.set("tokenizer.ggml.scores", ARR, (F32, [0.0] * n_vocab))
    spec.set("tokenizer.ggml.token_type", ARR, (I32, [1] * n_vocab))
    spec.set("tokenizer.ggml.bos_token_id", U32, 1).set("tokenizer.ggml.eos_token_id", U32, 2)
    spec.tensors.append(Tensor("token_embd.weight", (n_embd, n_vocab)))
    head_dim, kv_dim = n_embd // 4, 2 * (n_embd // 4)
    for layer in range(n_layer):
        spec.tensors += [
            Tensor(f"blk.{layer}.attn_norm.weight", (n_embd,)),
            Tensor(f"blk.{layer}.attn_q.weight", (n_embd, 4 * head_dim)),
            Tensor(f"blk.{layer}.attn_k.weight", (n_embd, kv_dim)),
            Tensor(f"blk.{layer}.attn_v.weight", (n_embd, kv_dim)),
            Tensor(f"blk.{layer}.attn_output.weight", (4 * head_dim, n_embd)),
            Tensor(f"blk.{layer}.ffn_norm.weight", (n_embd,)),
            Tensor(f"blk.{layer}.ffn_gate.weight", (n_embd, 64)),
            Tensor(f"blk.{layer}.ffn_up.weight", (n_embd, 64), 8),
            Tensor(f"blk.{layer}.ffn_down.weight", (64, n_embd)),
        ]
    spec.tensors.append(Tensor("output_norm.weight", (n_embd,)))
    spec.tensors.append(Tensor("output.weight", (n_embd, n_vocab), 1))
    return spec


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def rewrite_gguf(
    source: Path, target: Path, *, set_kv: dict[str, bytes] | None = None, drop: Iterable[str] = ()
) -> Path:
    """Copy a real GGUF with some metadata replaced, dropped or added (tensors unchanged)."""
    reader = gguf.GGUFReader(str(source))
    set_kv, dropped = dict(set_kv or {}), set(drop)
    kv_blobs: list[bytes] = []
    for name, reader_field in reader.fields.items():
        if name.startswith("GGUF.") or name in dropped:
            continue
        if name in set_kv:
            kv_blobs.append(enc_str(name) + set_kv.pop(name))
        else:
            kv_blobs.append(b"".join(bytes(part.tobytes()) for part in reader_field.parts))
    kv_blobs += [enc_str(name) + value for name, value in set_kv.items()]
    infos = b"".join(
        b"".join(bytes(part.tobytes()) for part in tensor.field.parts) for tensor in reader.tensors
    )
    head = b"GGUF" + struct.pack("<IQQ", 3, len(reader.tensors), len(kv_blobs))
    head += b"".join(kv_blobs) + infos
    head += b"\0" * (-len(head) % reader.alignment)
    data_start = min(tensor.data_offset for tensor in reader.tensors)
    with source.open("rb") as src, target.open("wb") as dst:
        dst.write(head)
        src.seek(data_start)
        dst.write(src.read())
    return target
