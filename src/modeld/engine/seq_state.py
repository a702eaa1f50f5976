"""A sequence's KV state out of a llama.cpp context and back: the prompt cache's hands.

``llama_state_seq_get_data`` copies sequence 0's cells (positions, token KV, for every
layer and, on Gemma 3, for the sliding-window cache as well) into host memory;
``llama_state_seq_set_data`` writes such a copy back. Only the owner thread of the context
may call these (see :class:`~modeld.engine.llama_engine.LlamaEngine`). A restore is
checked as :func:`~modeld.engine.kv_prefix.keep_prefix` checks a cut: the sequence must
end at ``n_tokens - 1`` and reach back as far as the next token looks, else the cache is
cleared and nothing is kept.

Sliding-window models (Gemma 3): llama.cpp writes only the window cells the sequence's
last position still sees (``is_masked_swa`` in ``llama_kv_cache::state_write``), even with
``swa_full``. A restored window cache therefore starts at ``n_tokens - n_swa``: exact for
a prompt that goes on from the entry's very end, never for one that parts from it
earlier (the cells before the cut would be missing). :func:`usable_prefix` says so.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llama_cpp

from modeld.engine.kv_prefix import reusable_prefix

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["SEQ_ID", "read_state", "sliding_window", "usable_prefix", "write_state"]

SEQ_ID = 0  # modeld runs one sequence per context


def sliding_window(llama: Llama) -> int:
    """The model's sliding window in tokens (0: none)."""
    return max(0, int(llama_cpp.llama_model_n_swa(llama.model)))


def usable_prefix(entry: Sequence[int], prompt: Sequence[int], n_swa: int) -> int:
    """How many leading tokens of ``prompt`` a restore of ``entry`` can keep exactly,
    leaving one to evaluate: their common prefix, or with a sliding window all of
    ``entry`` or nothing (see the module docstring)."""
    shared = reusable_prefix(entry, prompt)
    if n_swa > 0 and shared < len(entry):
        return 0
    return shared


# A bytes object of a given size, its contents not yet written: CPython's own
# constructor for a buffer to fill before anyone else sees it.
_uninitialised_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_uninitialised_bytes.restype = ctypes.py_object
_uninitialised_bytes.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]


def read_state(llama: Llama, max_bytes: int) -> bytes | None:
    """Sequence 0's state as bytes; None when empty or larger than ``max_bytes`` (the
    size is asked first, so an oversized state is never copied).

    llama.cpp writes straight into the new bytes object's buffer: one pass over the
    state, where a zeroed ctypes buffer copied into bytes took three (half the time
    of a 7.6 MiB Gemma state, 1.7 ms against 0.8 here)."""
    size_bytes = int(llama_cpp.llama_state_seq_get_size(llama.ctx, SEQ_ID))
    if size_bytes <= 0 or size_bytes > max_bytes:
        return None
    payload: bytes = _uninitialised_bytes(None, size_bytes)  # ours alone until returned
    target = ctypes.cast(ctypes.c_char_p(payload), ctypes.POINTER(ctypes.c_uint8))
    written = int(llama_cpp.llama_state_seq_get_data(llama.ctx, target, size_bytes, SEQ_ID))
    if written <= 0 or written > size_bytes:
        return None
    return payload if written == size_bytes else payload[:written]


def write_state(llama: Llama, data: bytes, n_tokens: int) -> bool:
    """Replace the context's KV with ``data`` (read from this model with this context's
    parameters: the caller checked that), which must hold positions ``[0, n_tokens)``.

    Returns False, with the cache cleared, when llama.cpp refuses it or the restored
    sequence does not end at ``n_tokens - 1`` or does not reach back to where position
    ``n_tokens`` looks (0 without a window).
    """
    n_swa = sliding_window(llama)
    oldest_needed = n_tokens - n_swa if 0 < n_swa < n_tokens else 0
    memory = llama_cpp.llama_get_memory(llama.ctx)
    llama_cpp.llama_memory_clear(memory, True)
    # llama.cpp only reads the source: point at the bytes' own buffer, no 8 MiB copy
    buffer = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
    read = int(llama_cpp.llama_state_seq_set_data(llama.ctx, buffer, len(data), SEQ_ID))
    if (
        read == len(data)
        and 0 <= llama_cpp.llama_memory_seq_pos_min(memory, SEQ_ID) <= oldest_needed
        and llama_cpp.llama_memory_seq_pos_max(memory, SEQ_ID) == n_tokens - 1
    ):
        return True
    llama_cpp.llama_memory_clear(memory, True)
    return False
