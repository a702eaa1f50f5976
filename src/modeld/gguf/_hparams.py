"""Hyperparameter and tokenizer checks: every value llama.cpp would size or assert on,
bounded before llama.cpp sees the file (some bad values abort the whole process there)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from modeld.errors import ModelInvalid
from modeld.gguf._raw import (
    INTEGER_TYPES,
    MAX_STRING_BYTES,
    SCALAR_LAYOUTS,
    KvEntry,
    RawGguf,
    ValueType,
)
from modeld.gguf._source import ByteSource
from modeld.gguf._vocab import check_vocabulary

__all__ = ["MAX_BLOCK_COUNT", "Hyperparameters", "read_hyperparameters"]

MAX_BLOCK_COUNT = 512  # LLAMA_MAX_LAYERS: llama.cpp aborts above it
MAX_EMBEDDING_LENGTH = 1 << 17
MAX_HEAD_COUNT = 1 << 12
MAX_HEAD_LENGTH = 1 << 13
MAX_FEED_FORWARD_LENGTH = 1 << 20
MAX_VOCAB = 1 << 22
MAX_EXPERTS = 512  # LLAMA_MAX_EXPERTS
MAX_ARCHITECTURE_BYTES = 64
MAX_NAME_CHARS = 256
MAX_CHAT_TEMPLATE_BYTES = 1 << 20
_ARCHITECTURE = re.compile(r"[a-z0-9][a-z0-9_\-]*")
_NO_TOKEN = (-1, 0xFFFF_FFFF)  # LLAMA_TOKEN_NULL, signed or unsigned
# Arrays llama.cpp reads through raw pointers: a wrong element type or count is an
# out-of-bounds read or an assert there, so type and count are checked here.
_TOKENIZER_ARRAYS: dict[str, tuple[ValueType, ...]] = {
    "tokenizer.ggml.tokens": (ValueType.STRING,),
    "tokenizer.ggml.scores": (ValueType.FLOAT32,),
    "tokenizer.ggml.token_type": (ValueType.INT32,),
    "tokenizer.ggml.merges": (ValueType.STRING,),
    "tokenizer.ggml.precompiled_charsmap": (ValueType.UINT8, ValueType.INT8),
}


@dataclass(frozen=True, slots=True)
class Hyperparameters:
    architecture: str
    name: str
    context_length: int
    block_count: int
    embedding_length: int
    head_count_per_layer: tuple[int, ...]
    head_count_kv_per_layer: tuple[int, ...]
    feed_forward_length: int
    key_length: int
    value_length: int
    n_vocab: int
    expert_count: int
    expert_used_count: int
    sliding_window: int
    feed_forward_per_layer: tuple[int, ...] = ()


class _Reader:
    """Typed access to the metadata, with errors that name the key."""

    def __init__(self, raw: RawGguf, source: ByteSource, label: str) -> None:
        self.kv = raw.kv
        self.source = source
        self.label = label

    def fail(self, message: str) -> ModelInvalid:
        return ModelInvalid(f"{self.label}: {message}")

    def string(self, key: str, limit_bytes: int) -> str | None:
        entry = self.kv.get(key)
        if entry is None:
            return None
        if entry.value_type is not ValueType.STRING:
            raise self.fail(f"{key} must be a string")
        if entry.length > limit_bytes:
            raise self.fail(f"{key} is {entry.length} bytes long (limit {limit_bytes})")
        data = self.source.read_at(entry.data_offset, entry.length, key)
        return data.decode("utf-8", errors="replace")

    def integer(self, key: str, low: int, high: int, *, required: bool = False) -> int | None:
        entry = self.kv.get(key)
        if entry is None:
            if required:
                raise self.fail(f"missing required metadata key {key}")
            return None
        if entry.value_type not in INTEGER_TYPES:
            raise self.fail(f"{key} must be an integer, not {entry.value_type.name}")
        value = int(entry.scalar or 0)
        if not low <= value <= high:
            raise self.fail(f"{key} = {value} is out of range {low}..{high}")
        return value

    def per_layer(self, key: str, n_layer: int, low: int, high: int) -> tuple[int, ...] | None:
        """A scalar, or an array with one integer per layer (llama.cpp accepts both)."""
        entry = self.kv.get(key)
        if entry is None:
            return None
        if entry.value_type is not ValueType.ARRAY:
            value = self.integer(key, max(low, 1), high)
            assert value is not None
            return (value,) * n_layer
        if entry.element_type not in INTEGER_TYPES or entry.length != n_layer:
            raise self.fail(f"{key} must be an integer or {n_layer} integers, one per layer")
        assert entry.element_type is not None
        layout = SCALAR_LAYOUTS[entry.element_type]
        data = self.source.read_at(entry.data_offset, layout.size * n_layer, key)
        values = tuple(int(item[0]) for item in layout.iter_unpack(data))
        if any(not low <= value <= high for value in values) or max(values) < 1:
            raise self.fail(f"{key} has a per-layer value out of range {low}..{high}")
        return values

    def array(self, key: str, element_types: tuple[ValueType, ...]) -> KvEntry | None:
        entry = self.kv.get(key)
        if entry is None:
            return None
        if entry.value_type is not ValueType.ARRAY or entry.element_type not in element_types:
            names = " or ".join(t.name for t in element_types)
            raise self.fail(f"{key} must be an array of {names}")
        return entry


def read_hyperparameters(
    raw: RawGguf, source: ByteSource, label: str, max_context_length: int
) -> Hyperparameters:
    reader = _Reader(raw, source, label)
    architecture = _architecture(reader)
    name = (reader.string("general.name", MAX_STRING_BYTES) or "")[:MAX_NAME_CHARS]

    def key(suffix: str) -> str:
        return f"{architecture}.{suffix}"

    block_count = _required(reader, key("block_count"), 1, MAX_BLOCK_COUNT)
    context_length = _required(reader, key("context_length"), 1, max_context_length)
    embedding_length = _required(reader, key("embedding_length"), 1, MAX_EMBEDDING_LENGTH)
    heads = reader.per_layer(key("attention.head_count"), block_count, 0, MAX_HEAD_COUNT)
    heads = heads or (0,) * block_count
    kv_heads = reader.per_layer(key("attention.head_count_kv"), block_count, 0, MAX_HEAD_COUNT)
    kv_heads = kv_heads or heads
    for layer, (n_head, n_head_kv) in enumerate(zip(heads, kv_heads, strict=True)):
        if n_head_kv > n_head or (n_head_kv and n_head % n_head_kv):
            raise reader.fail(
                f"layer {layer}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"
            )
    feed_forward = reader.per_layer(
        key("feed_forward_length"), block_count, 0, MAX_FEED_FORWARD_LENGTH
    )
    key_length, value_length = _head_lengths(reader, key, embedding_length, max(heads))
    expert_count = reader.integer(key("expert_count"), 0, MAX_EXPERTS) or 0
    expert_used_count = reader.integer(key("expert_used_count"), 0, expert_count) or 0
    if (expert_count == 0) != (expert_used_count == 0):
        raise reader.fail(
            f"expert_count {expert_count} and expert_used_count {expert_used_count} "
            "must both be zero or both be positive"
        )
    sliding_window = reader.integer(key("attention.sliding_window"), 0, 1 << 31) or 0
    return Hyperparameters(
        architecture=architecture,
        name=name,
        context_length=context_length,
        block_count=block_count,
        embedding_length=embedding_length,
        head_count_per_layer=heads,
        head_count_kv_per_layer=kv_heads,
        feed_forward_length=max(feed_forward or (0,)),
        key_length=key_length,
        value_length=value_length,
        n_vocab=_vocabulary(reader),
        expert_count=expert_count,
        expert_used_count=expert_used_count,
        sliding_window=sliding_window,
        feed_forward_per_layer=feed_forward or (0,) * block_count,
    )


def _required(reader: _Reader, key: str, low: int, high: int) -> int:
    value = reader.integer(key, low, high, required=True)
    assert value is not None
    return value


def _architecture(reader: _Reader) -> str:
    architecture = reader.string("general.architecture", MAX_ARCHITECTURE_BYTES)
    if architecture is None:
        raise reader.fail("missing required metadata key general.architecture")
    if not _ARCHITECTURE.fullmatch(architecture):
        raise reader.fail(f"general.architecture {architecture!r} is not a valid name")
    return architecture


def _head_lengths(
    reader: _Reader, key: Callable[[str], str], embedding_length: int, max_heads: int
) -> tuple[int, int]:
    key_length = reader.integer(key("attention.key_length"), 1, MAX_HEAD_LENGTH)
    value_length = reader.integer(key("attention.value_length"), 1, MAX_HEAD_LENGTH)
    missing_length = key_length is None or value_length is None
    if missing_length and max_heads and embedding_length % max_heads:
        raise reader.fail(
            f"embedding_length {embedding_length} is not a multiple of "
            f"head_count {max_heads}, and no attention.key_length is given"
        )
    default_length = embedding_length // max_heads if max_heads else 0
    return key_length or default_length, value_length or default_length


def _vocabulary(reader: _Reader) -> int:
    entries = {key: reader.array(key, types) for key, types in _TOKENIZER_ARRAYS.items()}
    tokens = entries["tokenizer.ggml.tokens"]
    if tokens is None:
        raise reader.fail("missing required metadata key tokenizer.ggml.tokens")
    n_vocab = tokens.length
    if not 1 <= n_vocab <= MAX_VOCAB:
        raise reader.fail(f"tokenizer.ggml.tokens has {n_vocab} tokens (need 1..{MAX_VOCAB})")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        entry = entries[key]
        if entry is not None and entry.length != n_vocab:
            raise reader.fail(f"{key} has {entry.length} entries for {n_vocab} tokens")
    for key in sorted(reader.kv):
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            token_id = reader.integer(key, -1, 0xFFFF_FFFF)
            if token_id is not None and token_id not in _NO_TOKEN and token_id >= n_vocab:
                raise reader.fail(f"{key} = {token_id} is not below the {n_vocab} tokens")
    tokenizer_model = reader.string("tokenizer.ggml.model", MAX_ARCHITECTURE_BYTES)
    check_vocabulary(
        reader.source, reader.label, tokenizer_model, tokens, entries["tokenizer.ggml.token_type"]
    )
    template = reader.kv.get("tokenizer.chat_template")
    if template is not None and (
        template.value_type is not ValueType.STRING or template.length > MAX_CHAT_TEMPLATE_BYTES
    ):
        raise reader.fail(
            f"tokenizer.chat_template must be a string of at most {MAX_CHAT_TEMPLATE_BYTES} bytes"
        )
    return n_vocab
