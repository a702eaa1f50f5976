"""A bounded, pure-Python GGUF header parser and validator.

llama.cpp aborts the whole process on some bad files, and gguf-py's ``GGUFReader`` is not
a validator (it trusts declared lengths), so every model file passes through
:func:`read_gguf_header` before llama.cpp sees it. The checks, and what each bad file
gets, are tabulated in ``docs/memory.md``.

Guarantees: the only exception raised for a bad file is :class:`ModelInvalid`, with a
message naming the file and the problem; time is linear in the header (never in a
declared count the file cannot hold); memory is bounded by the limits below, whatever
the file declares; the file is opened only if it is a regular file and is read with
``pread`` (a file truncated under an ``mmap`` would raise SIGBUS).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from modeld.errors import ModelInvalid
from modeld.gguf._ggml_types import GGML_TYPES
from modeld.gguf._hparams import read_hyperparameters
from modeld.gguf._layout import check_tensor_layout
from modeld.gguf._raw import RawGguf, RawTensor, parse_raw
from modeld.gguf._source import ByteSource
from modeld.sizes import MAX_CONTEXT_TOKENS

__all__ = [
    "FileIdentity",
    "GgufHeader",
    "TensorInfo",
    "open_regular_file",
    "read_gguf_header",
    "read_header_from_fd",
]

_LAYER_TENSOR = re.compile(r"blk\.(\d{1,6})\.")
_OUTPUT_TENSOR_PREFIXES = ("output.", "output_norm.")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    ggml_type: int
    ggml_type_name: str
    shape: tuple[int, ...]  # ne[0] first, as in the file
    nbytes: int
    file_offset_bytes: int  # absolute, in the file


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What the file looked like when it was parsed; compare to detect in-place changes."""

    device: int
    inode: int
    size_bytes: int
    mtime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileIdentity:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class GgufHeader:
    """A validated GGUF header.

    Per-layer hyperparameters are kept per layer (``*_per_layer``, length
    ``block_count``); the scalar fields are their maxima. ``key_length``/``value_length``
    default to ``embedding_length // head_count`` when the file omits them.

    Weight bytes are split the way llama.cpp places them: ``layer_weight_bytes[i]`` is
    the ``blk.i.*`` tensors; ``output_weight_bytes`` the output layer (``output*``,
    plus ``token_embd`` again when embeddings are tied, since llama.cpp then duplicates
    it onto the output device); everything else (the input embeddings and any
    ``blk.N`` at or past ``block_count``) is in ``input_weight_bytes``.
    """

    path: Path
    identity: FileIdentity
    version: int
    architecture: str
    name: str
    context_length: int
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    head_count_per_layer: tuple[int, ...]
    head_count_kv_per_layer: tuple[int, ...]
    key_length: int
    value_length: int
    feed_forward_length: int
    n_vocab: int
    expert_count: int
    expert_used_count: int
    sliding_window: int
    metadata_count: int
    alignment_bytes: int
    data_offset_bytes: int
    tensors: tuple[TensorInfo, ...]
    total_weight_bytes: int
    layer_weight_bytes: tuple[int, ...]
    input_weight_bytes: int
    output_weight_bytes: int
    tied_embeddings: bool

    @property
    def file_size_bytes(self) -> int:
        return self.identity.size_bytes


def read_gguf_header(path: Path, *, max_context_length: int = MAX_CONTEXT_TOKENS) -> GgufHeader:
    """Parse and validate the header of the GGUF file at ``path``.

    Raises :class:`ModelInvalid` when the path is not a readable regular file, or the
    header is malformed, inconsistent with the file size, or declares a value outside
    the bounds modeld allows (``<arch>.context_length`` above ``max_context_length``,
    ``<arch>.block_count`` above 512, ...). Nothing else escapes for any file content.
    """
    label = path.name or str(path)
    fd = open_regular_file(path, label)
    try:
        return read_header_from_fd(fd, path, label, max_context_length)
    finally:
        os.close(fd)


def open_regular_file(path: Path, label: str) -> int:
    """A read-only descriptor of ``path``; :class:`ModelInvalid` unless a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ModelInvalid(f"{label}: cannot open: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL in the path
        raise ModelInvalid(f"{label}: cannot open: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelInvalid(f"{label}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_header_from_fd(
    fd: int, path: Path, label: str, max_context_length: int = MAX_CONTEXT_TOKENS
) -> GgufHeader:
    """:func:`read_gguf_header` through an open descriptor (which stays open): the
    header describes exactly the inode behind ``fd``, whatever ``path`` names now."""
    if max_context_length < 1:
        raise ValueError("max_context_length must be positive")
    try:
        info = os.fstat(fd)
        identity = FileIdentity.of(info)
        source = ByteSource(fd, info.st_size, label)
        raw = parse_raw(source, label)
        return _assemble(path, identity, raw, source, label, max_context_length)
    except MemoryError as exc:  # bounded by design; kept as a last guard
        raise ModelInvalid(f"{label}: header too large to validate") from exc


def _assemble(
    path: Path,
    identity: FileIdentity,
    raw: RawGguf,
    source: ByteSource,
    label: str,
    max_context_length: int,
) -> GgufHeader:
    hparams = read_hyperparameters(raw, source, label, max_context_length)
    if not raw.tensors:
        raise ModelInvalid(f"{label}: the file has no tensors")
    _refuse_split(raw, label)
    check_tensor_layout(hparams, raw.tensors, label)
    layer_bytes = [0] * hparams.block_count
    input_bytes = output_bytes = 0
    names = {tensor.name: tensor for tensor in raw.tensors}
    for tensor in raw.tensors:
        match = _LAYER_TENSOR.match(tensor.name)
        if match and int(match.group(1)) < hparams.block_count:
            layer_bytes[int(match.group(1))] += tensor.nbytes
        elif tensor.name.startswith(_OUTPUT_TENSOR_PREFIXES):
            output_bytes += tensor.nbytes
        else:
            input_bytes += tensor.nbytes
    tied = "output.weight" not in names and "token_embd.weight" in names
    if tied:
        output_bytes += names["token_embd.weight"].nbytes
    return GgufHeader(
        path=path,
        identity=identity,
        version=raw.version,
        architecture=hparams.architecture,
        name=hparams.name,
        context_length=hparams.context_length,
        block_count=hparams.block_count,
        embedding_length=hparams.embedding_length,
        head_count=max(hparams.head_count_per_layer),
        head_count_kv=max(hparams.head_count_kv_per_layer),
        head_count_per_layer=hparams.head_count_per_layer,
        head_count_kv_per_layer=hparams.head_count_kv_per_layer,
        key_length=hparams.key_length,
        value_length=hparams.value_length,
        feed_forward_length=hparams.feed_forward_length,
        n_vocab=hparams.n_vocab,
        expert_count=hparams.expert_count,
        expert_used_count=hparams.expert_used_count,
        sliding_window=hparams.sliding_window,
        metadata_count=len(raw.kv),
        alignment_bytes=raw.alignment_bytes,
        data_offset_bytes=raw.data_offset_bytes,
        tensors=tuple(_tensor_info(tensor, raw.data_offset_bytes) for tensor in raw.tensors),
        total_weight_bytes=sum(tensor.nbytes for tensor in raw.tensors),
        layer_weight_bytes=tuple(layer_bytes),
        input_weight_bytes=input_bytes,
        output_weight_bytes=output_bytes,
        tied_embeddings=tied,
    )


def _refuse_split(raw: RawGguf, label: str) -> None:
    """A split model's other parts are found by llama.cpp by file name, not validated
    here and not bound to the loaded inode: refused (merge them with
    ``llama-gguf-split --merge``)."""
    entry = raw.kv.get("split.count")
    if entry is not None and entry.scalar is not None and int(entry.scalar) > 1:
        raise ModelInvalid(
            f"{label}: part of a split model ({int(entry.scalar)} files); modeld loads "
            "single-file GGUF models only (merge with llama-gguf-split --merge)"
        )


def _tensor_info(tensor: RawTensor, data_offset_bytes: int) -> TensorInfo:
    return TensorInfo(
        name=tensor.name,
        ggml_type=tensor.ggml_type,
        ggml_type_name=GGML_TYPES[tensor.ggml_type].name,
        shape=tensor.shape,
        nbytes=tensor.nbytes,
        file_offset_bytes=data_offset_bytes + tensor.offset_bytes,
    )
