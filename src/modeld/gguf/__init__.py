"""The GGUF file format: a bounded, validating header reader.

llama.cpp never sees a file that :func:`read_gguf_header` refuses (it aborts the whole
process on some bad files); the checks are tabulated in ``docs/memory.md`` and
``docs/bad-inputs.md``. :class:`OpenGguf` validates and loads one inode through one
descriptor. :class:`FileIdentity` tells whether a file changed since it was looked at.
"""

from modeld.gguf._file import OpenGguf
from modeld.gguf._header import FileIdentity, GgufHeader, TensorInfo, read_gguf_header

__all__ = ["FileIdentity", "GgufHeader", "OpenGguf", "TensorInfo", "read_gguf_header"]
