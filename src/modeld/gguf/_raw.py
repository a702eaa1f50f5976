"""The structural pass over a GGUF header: magic, counts, key/value pairs, tensor infos.

Modelled on llama.cpp ``ggml/src/gguf.cpp`` (every count bounded by the bytes left) plus
modeld's own checks on tensor offsets. Values are not materialised: a key/value entry
keeps scalars, and for strings and arrays only their type, length and file offset, so
memory stays bounded whatever the file declares. :mod:`modeld.gguf._header` reads the few
values it needs afterwards by offset.
"""

from __future__ import annotations

import enum
import itertools
import struct
from dataclasses import dataclass

from modeld.errors import ModelInvalid
from modeld.gguf._ggml_types import GGML_TYPES
from modeld.gguf._source import ByteSource

__all__ = [
    "DEFAULT_ALIGNMENT_BYTES",
    "MAX_STRING_BYTES",
    "KvEntry",
    "RawGguf",
    "RawTensor",
    "ValueType",
    "parse_raw",
]

GGUF_MAGIC = b"GGUF"
MAX_TENSORS = 65_536
MAX_KV = 65_536
MAX_KEY_BYTES = 256
MAX_STRING_BYTES = 1 << 20
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the NUL
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 62
DEFAULT_ALIGNMENT_BYTES = 32
MAX_ALIGNMENT_BYTES = 1 << 20
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, ne[0], type, offset


class ValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


SCALAR_LAYOUTS: dict[ValueType, struct.Struct] = {
    ValueType.UINT8: struct.Struct("<B"),
    ValueType.INT8: struct.Struct("<b"),
    ValueType.UINT16: struct.Struct("<H"),
    ValueType.INT16: struct.Struct("<h"),
    ValueType.UINT32: struct.Struct("<I"),
    ValueType.INT32: struct.Struct("<i"),
    ValueType.FLOAT32: struct.Struct("<f"),
    ValueType.BOOL: struct.Struct("<B"),
    ValueType.UINT64: struct.Struct("<Q"),
    ValueType.INT64: struct.Struct("<q"),
    ValueType.FLOAT64: struct.Struct("<d"),
}
INTEGER_TYPES = frozenset(
    {
        ValueType.UINT8,
        ValueType.INT8,
        ValueType.UINT16,
        ValueType.INT16,
        ValueType.UINT32,
        ValueType.INT32,
        ValueType.UINT64,
        ValueType.INT64,
    }
)


@dataclass(frozen=True, slots=True)
class KvEntry:
    """One metadata value: a scalar in full, a string or array by type, length, offset."""

    value_type: ValueType
    scalar: int | float | None = None
    length: int = 0  # string bytes, or array elements
    element_type: ValueType | None = None
    data_offset: int = 0  # first string byte, or first array element


@dataclass(frozen=True, slots=True)
class RawTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset_bytes: int  # relative to the data section
    nbytes: int


@dataclass(frozen=True, slots=True)
class RawGguf:
    version: int
    kv: dict[str, KvEntry]
    tensors: tuple[RawTensor, ...]
    alignment_bytes: int
    data_offset_bytes: int


def parse_raw(source: ByteSource, label: str) -> RawGguf:
    """Parse and structurally validate the header; raise :class:`ModelInvalid` on any flaw."""
    version, n_tensors, n_kv = _read_preamble(source, label)
    kv = _read_kv(source, label, n_kv)
    alignment_bytes = _alignment(kv, label)
    tensors = _read_tensor_infos(source, label, n_tensors, alignment_bytes)
    data_offset_bytes = -(-source.position // alignment_bytes) * alignment_bytes
    if data_offset_bytes > source.size_bytes:
        raise ModelInvalid(
            f"{label}: truncated: the data section would start at {data_offset_bytes}, "
            f"past the end of the {source.size_bytes}-byte file"
        )
    _check_tensor_ranges(tensors, source.size_bytes - data_offset_bytes, label)
    return RawGguf(version, kv, tensors, alignment_bytes, data_offset_bytes)


def _read_preamble(source: ByteSource, label: str) -> tuple[int, int, int]:
    magic = source.take(4, "the magic")
    if magic != GGUF_MAGIC:
        raise ModelInvalid(f"{label}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = source.u32("the version")
    if version & 0xFFFF == 0 and version != 0:
        raise ModelInvalid(f"{label}: GGUF byte order does not match (a big-endian file?)")
    if version not in (2, 3):
        raise ModelInvalid(f"{label}: unsupported GGUF version {version} (need 2 or 3)")
    n_tensors = source.u64("the tensor count")
    n_kv = source.u64("the metadata count")
    if n_tensors > MAX_TENSORS or n_tensors * _MIN_TENSOR_INFO_BYTES > source.remaining_bytes:
        raise ModelInvalid(
            f"{label}: tensor count {n_tensors} is impossible "
            f"(limit {MAX_TENSORS}, and the file has {source.remaining_bytes} bytes left)"
        )
    if n_kv > MAX_KV or n_kv * _MIN_KV_BYTES > source.remaining_bytes:
        raise ModelInvalid(
            f"{label}: metadata count {n_kv} is impossible "
            f"(limit {MAX_KV}, and the file has {source.remaining_bytes} bytes left)"
        )
    return version, n_tensors, n_kv


def _read_string_length(source: ByteSource, label: str, what: str, limit_bytes: int) -> int:
    length_bytes = source.u64(f"the length of {what}")
    if length_bytes > limit_bytes:
        raise ModelInvalid(f"{label}: {what} is {length_bytes} bytes long (limit {limit_bytes})")
    if length_bytes > source.remaining_bytes:
        raise source.truncated(length_bytes, what)
    return length_bytes


def _value_type(raw_type: int, label: str, what: str) -> ValueType:
    try:
        return ValueType(raw_type)
    except ValueError:
        raise ModelInvalid(f"{label}: {what} has unknown value type {raw_type}") from None


def _read_kv(source: ByteSource, label: str, n_kv: int) -> dict[str, KvEntry]:
    entries: dict[str, KvEntry] = {}
    for index in range(n_kv):
        what = f"metadata key #{index}"
        key_length_bytes = _read_string_length(source, label, what, MAX_KEY_BYTES)
        if key_length_bytes == 0:
            raise ModelInvalid(f"{label}: {what} is empty")
        key_bytes = source.take(key_length_bytes, what)
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelInvalid(f"{label}: {what} is not UTF-8") from None
        if key in entries:
            raise ModelInvalid(f"{label}: duplicate metadata key {key!r}")
        value_type = _value_type(source.u32(f"the type of {key!r}"), label, repr(key))
        entries[key] = _read_value(source, label, key, value_type)
    return entries


def _read_value(source: ByteSource, label: str, key: str, value_type: ValueType) -> KvEntry:
    what = f"the value of {key!r}"
    if value_type is ValueType.STRING:
        length_bytes = _read_string_length(source, label, what, MAX_STRING_BYTES)
        offset = source.position
        source.skip(length_bytes, what)
        return KvEntry(value_type, length=length_bytes, data_offset=offset)
    if value_type is ValueType.ARRAY:
        element_type = _value_type(source.u32(f"the element type of {key!r}"), label, what)
        count = source.u64(f"the element count of {key!r}")
        offset = source.position
        if element_type is ValueType.ARRAY:
            raise ModelInvalid(f"{label}: {what} is an array of arrays (not supported)")
        if element_type is ValueType.STRING:
            if count * 8 > source.remaining_bytes:
                raise ModelInvalid(
                    f"{label}: {what} declares {count} strings; only "
                    f"{source.remaining_bytes} bytes are left"
                )
            source.skip_strings(count, MAX_STRING_BYTES, what)
        else:
            element_bytes = SCALAR_LAYOUTS[element_type].size
            if count * element_bytes > source.remaining_bytes:
                raise ModelInvalid(
                    f"{label}: {what} declares {count} elements of {element_bytes} bytes; "
                    f"only {source.remaining_bytes} bytes are left"
                )
            source.skip(count * element_bytes, what)
        return KvEntry(value_type, length=count, element_type=element_type, data_offset=offset)
    scalar = source.unpack(SCALAR_LAYOUTS[value_type], what)[0]
    assert isinstance(scalar, int | float)
    return KvEntry(value_type, scalar=scalar)


def _alignment(kv: dict[str, KvEntry], label: str) -> int:
    entry = kv.get("general.alignment")
    if entry is None:
        return DEFAULT_ALIGNMENT_BYTES
    if entry.value_type is not ValueType.UINT32:
        raise ModelInvalid(f"{label}: general.alignment must be a uint32")
    alignment = int(entry.scalar or 0)
    if alignment < 8 or alignment > MAX_ALIGNMENT_BYTES or alignment & (alignment - 1):
        raise ModelInvalid(
            f"{label}: general.alignment {alignment} must be a power of two "
            f"in 8..{MAX_ALIGNMENT_BYTES}"
        )
    return alignment


def _read_tensor_infos(
    source: ByteSource, label: str, n_tensors: int, alignment_bytes: int
) -> tuple[RawTensor, ...]:
    tensors: list[RawTensor] = []
    names: set[bytes] = set()
    for index in range(n_tensors):
        what = f"tensor #{index}"
        name_length_bytes = _read_string_length(
            source, label, f"the name of {what}", MAX_TENSOR_NAME_BYTES
        )
        if name_length_bytes == 0:
            raise ModelInvalid(f"{label}: {what} has an empty name")
        name_bytes = source.take(name_length_bytes, f"the name of {what}")
        if name_bytes in names:
            raise ModelInvalid(f"{label}: duplicate tensor name {name_bytes!r}")
        names.add(name_bytes)
        name = name_bytes.decode("utf-8", errors="replace")
        tensors.append(_read_tensor_info(source, label, f"tensor {name!r}", name, alignment_bytes))
    return tuple(tensors)


def _read_tensor_info(
    source: ByteSource, label: str, what: str, name: str, alignment_bytes: int
) -> RawTensor:
    n_dims = source.u32(f"the dimension count of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise ModelInvalid(f"{label}: {what} has {n_dims} dimensions (need 1..{MAX_DIMS})")
    shape = tuple(source.u64(f"the shape of {what}") for _ in range(n_dims))
    elements = 1
    for dim in shape:
        if dim < 1:
            raise ModelInvalid(f"{label}: {what} has a zero dimension {shape}")
        elements *= dim
        if elements >= MAX_ELEMENTS:
            raise ModelInvalid(f"{label}: {what} has too many elements {shape}")
    ggml_type = source.u32(f"the type of {what}")
    type_info = GGML_TYPES.get(ggml_type)
    if type_info is None:
        raise ModelInvalid(f"{label}: {what} has unknown ggml type {ggml_type}")
    if shape[0] % type_info.block_elements:
        raise ModelInvalid(
            f"{label}: {what} row length {shape[0]} is not a multiple of the "
            f"{type_info.name} block size {type_info.block_elements}"
        )
    offset_bytes = source.u64(f"the offset of {what}")
    if offset_bytes % alignment_bytes:
        raise ModelInvalid(
            f"{label}: {what} offset {offset_bytes} is not aligned to {alignment_bytes}"
        )
    nbytes = elements // type_info.block_elements * type_info.block_bytes
    return RawTensor(name, ggml_type, shape, offset_bytes, nbytes)


def _check_tensor_ranges(tensors: tuple[RawTensor, ...], data_bytes: int, label: str) -> None:
    total_bytes = 0
    for tensor in tensors:
        if tensor.offset_bytes + tensor.nbytes > data_bytes:
            raise ModelInvalid(
                f"{label}: tensor {tensor.name!r} ({tensor.nbytes} bytes at data offset "
                f"{tensor.offset_bytes}) runs past the {data_bytes}-byte data section"
            )
        total_bytes += tensor.nbytes
    if total_bytes > data_bytes:
        raise ModelInvalid(
            f"{label}: tensors total {total_bytes} bytes, more than the "
            f"{data_bytes}-byte data section"
        )
    ordered = sorted(tensors, key=lambda tensor: tensor.offset_bytes)
    for before, after in itertools.pairwise(ordered):
        if before.offset_bytes + before.nbytes > after.offset_bytes:
            raise ModelInvalid(
                f"{label}: tensor {after.name!r} (data offset {after.offset_bytes}) overlaps "
                f"tensor {before.name!r} ({before.nbytes} bytes at {before.offset_bytes})"
            )
