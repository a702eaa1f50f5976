"""What this llama.cpp build can do with a GPU (``engine`` is the only importer of
llama_cpp)."""

from __future__ import annotations

__all__ = ["gpu_offload_available"]


def gpu_offload_available() -> bool:
    """True when this llama.cpp build can offload layers to a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())
