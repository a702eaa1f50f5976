"""The GGUF file format: a bounded, validating header reader.

llama.cpp never sees a file that :func:`read_gguf_header` refuses (it aborts the whole
process on some bad files); the checks are tabulated in ``docs/memory.md`` and
``docs/bad-inputs.md``. :class:`OpenGguf` validates and loads one inode through one
descriptor. :class:`FileIdentity` tells whether a file changed since it was looked at.
:func:`read_gguf_metadata` gives the metadata as values, for display.
"""

from modeld.gguf._file import OpenGguf
from modeld.gguf._header import FileIdentity, GgufHeader, TensorInfo, read_gguf_header
from modeld.gguf._metadata import GgufMetadata, read_gguf_metadata

__all__ = [
    "FileIdentity",
    "GgufHeader",
    "GgufMetadata",
    "OpenGguf",
    "TensorInfo",
    "read_gguf_header",
    "read_gguf_metadata",
]
