"""What a cached sequence state belongs to: the model file, the context's shape, the build.

A state from ``llama_state_seq_get_data`` is only meaningful to a context made from the
same weights, with the same KV layout (context size, batch sizes, cache types, window
handling) by the same llama.cpp build. Every one of those is in :class:`Namespace`, and an
entry is restored only into a context whose namespace equals the entry's in every field.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import asdict, dataclass

import llama_cpp
import orjson

from modeld.gguf import FileIdentity

__all__ = ["Namespace", "llama_build"]


@functools.cache
def llama_build() -> str:
    """llama-cpp-python's version and the loaded libllama's size and mtime: a rebuild
    of the library (same version, other compiler flags or sources) is another build."""
    version = str(getattr(llama_cpp, "__version__", "unknown"))
    try:
        info = os.stat(llama_cpp.llama_cpp._lib._name)
    except (OSError, AttributeError, TypeError):
        return f"{version}+unknown"
    return f"{version}+{info.st_size}.{info.st_mtime_ns}"


@dataclass(frozen=True, slots=True)
class Namespace:
    """The fields that must match for a state to be restored (see module docstring)."""

    model_id: str
    device: int
    inode: int
    size_bytes: int
    mtime_ns: int
    n_ctx: int
    n_batch: int
    n_ubatch: int
    type_k: str  # modeld leaves llama.cpp's default (f16); named so a change shows
    type_v: str
    swa_full: bool
    build: str

    @classmethod
    def of(
        cls, model_id: str, identity: FileIdentity, n_ctx: int, n_batch: int, n_ubatch: int
    ) -> Namespace:
        return cls(
            model_id=model_id,
            device=identity.device,
            inode=identity.inode,
            size_bytes=identity.size_bytes,
            mtime_ns=identity.mtime_ns,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            type_k="f16",
            type_v="f16",
            swa_full=True,
            build=llama_build(),
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def digest(self) -> str:
        """32 hex digits naming the namespace in file names."""
        encoded = orjson.dumps(self.as_dict(), option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(encoded, digest_size=16).hexdigest()
