"""A GGUF file's metadata as values, for people: ``/api/show``'s ``model_info`` and the
details (family, parameter count, quantisation) that ``/api/tags`` lists.

The structural pass (:func:`parse_raw`) bounds every length first; values are then read
by offset. Arrays longer than :data:`MAX_ARRAY_ELEMENTS` (a vocabulary is 262,144
strings) are never materialised: they read as ``None``, as Ollama shows them.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from modeld.gguf._ggml_types import GGML_TYPES
from modeld.gguf._header import FileIdentity, open_regular_file
from modeld.gguf._raw import SCALAR_LAYOUTS, KvEntry, RawGguf, ValueType, parse_raw
from modeld.gguf._source import ByteSource

__all__ = ["MAX_ARRAY_ELEMENTS", "GgufMetadata", "read_gguf_metadata"]

MAX_ARRAY_ELEMENTS = 64
_SAMPLE_BYTES = 1 << 20  # of tensor data, from each end, in the digest
_U64 = struct.Struct("<Q")
_F32 = struct.Struct("<f")
# llama.cpp's llama_ftype (general.file_type), as its names are printed
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}  # fmt: skip

MetadataValue = int | float | bool | str | list[int | float | bool | str] | None


@dataclass(frozen=True, slots=True)
class GgufMetadata:
    """``values``: every key, scalars and strings as they are, short arrays as lists,
    long arrays as None. ``digest``: SHA-256 of the header and of the first and last MiB
    of tensor data, with the file size: stable, content-derived, and cheap (the weights
    are not read in full)."""

    identity: FileIdentity
    values: dict[str, MetadataValue]
    architecture: str
    parameter_count: int
    quantization: str
    digest: str


def read_gguf_metadata(path: Path) -> GgufMetadata:
    """Raises :class:`ModelInvalid` for a file that is not a readable, well-formed GGUF."""
    label = path.name or str(path)
    fd = open_regular_file(path, label)
    try:
        info = os.fstat(fd)
        source = ByteSource(fd, info.st_size, label)
        raw = parse_raw(source, label)
        values = {key: _value(source, key, entry) for key, entry in raw.kv.items()}
        architecture = values.get("general.architecture")
        return GgufMetadata(
            identity=FileIdentity.of(info),
            values=values,
            architecture=architecture if isinstance(architecture, str) else "",
            parameter_count=sum(_elements(tensor.shape) for tensor in raw.tensors),
            quantization=_quantization(raw, values.get("general.file_type")),
            digest=_digest(source, raw),
        )
    finally:
        os.close(fd)


def _value(source: ByteSource, key: str, entry: KvEntry) -> MetadataValue:
    if entry.value_type is ValueType.STRING:
        return source.read_at(entry.data_offset, entry.length, key).decode("utf-8", "replace")
    if entry.value_type is ValueType.ARRAY:
        if entry.length > MAX_ARRAY_ELEMENTS or entry.element_type is None:
            return None
        if entry.element_type is ValueType.STRING:
            return _strings(source, key, entry)
        layout = SCALAR_LAYOUTS[entry.element_type]
        data = source.read_at(entry.data_offset, layout.size * entry.length, key)
        return [_scalar(entry.element_type, item[0]) for item in layout.iter_unpack(data)]
    return _scalar(entry.value_type, entry.scalar)


def _strings(source: ByteSource, key: str, entry: KvEntry) -> list[int | float | bool | str]:
    strings: list[int | float | bool | str] = []
    offset = entry.data_offset
    for _ in range(entry.length):
        (length_bytes,) = _U64.unpack(source.read_at(offset, 8, key))
        strings.append(source.read_at(offset + 8, length_bytes, key).decode("utf-8", "replace"))
        offset += 8 + length_bytes
    return strings


def _scalar(value_type: ValueType, value: object) -> int | float | bool:
    if value_type is ValueType.BOOL:
        return bool(value)
    assert isinstance(value, int | float)
    if value_type is ValueType.FLOAT32:
        return _shortest_float32(float(value))
    return value


def _shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32 (``1e-06``, not the float64 widening
    ``9.999999974752427e-07``)."""
    stored = _F32.pack(value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if _F32.pack(candidate) == stored:
            return candidate
    return value


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _quantization(raw: RawGguf, file_type: MetadataValue) -> str:
    """``general.file_type``'s name; without one, the tensor type holding most bytes."""
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        name = _FILE_TYPES.get(file_type)
        if name is not None:
            return name
    weight = Counter[str]()
    for tensor in raw.tensors:
        weight[GGML_TYPES[tensor.ggml_type].name] += tensor.nbytes
    return weight.most_common(1)[0][0] if weight else "unknown"


def _digest(source: ByteSource, raw: RawGguf) -> str:
    digest = hashlib.sha256(_U64.pack(source.size_bytes))
    digest.update(source.read_at(0, raw.data_offset_bytes, "the header"))
    data_bytes = source.size_bytes - raw.data_offset_bytes
    head_bytes = min(_SAMPLE_BYTES, data_bytes)
    digest.update(source.read_at(raw.data_offset_bytes, head_bytes, "the tensor data"))
    tail_bytes = min(_SAMPLE_BYTES, data_bytes - head_bytes)
    digest.update(source.read_at(source.size_bytes - tail_bytes, tail_bytes, "the tensor data"))
    return digest.hexdigest()
