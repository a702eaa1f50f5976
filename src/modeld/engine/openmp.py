"""Release the OpenMP thread pool that the calling thread keeps.

llama.cpp's CPU backend runs each graph in an OpenMP parallel region. libgomp keeps one
pool of threads per thread that starts a region (each instance's worker thread), and a
region of one thread never shrinks it: the pool stays until that thread exits. Its
barriers spin only while the process's OpenMP threads (1 plus each pool's extra threads)
do not outnumber the cores; past that nearly every barrier of every model becomes a
futex sleep and wake. ``omp_pause_resource_all(omp_pause_hard)`` (OpenMP 5.0, libgomp
since GCC 9, LLVM's libomp) frees the calling thread's pool at once: the thread budget
calls it on an idle instance's worker when another instance needs the room.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

__all__ = ["pool_release_available", "release_pool"]

_OMP_PAUSE_HARD = 2
_RUNTIMES = ("libgomp.so.1", "libomp.so", "libomp.so.5", "libiomp5.so")


@functools.cache
def _pause_all() -> Callable[[int], int] | None:
    """``omp_pause_resource_all`` of the OpenMP runtime llama.cpp loaded (never one of
    our own: ``RTLD_NOLOAD`` binds only a library already in the process); None when
    llama.cpp was built without OpenMP, or off Linux."""
    import llama_cpp  # noqa: F401  (loads ggml, and with it the OpenMP runtime)

    for name in _RUNTIMES:
        try:
            library = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        except (OSError, AttributeError):
            continue
        pause = getattr(library, "omp_pause_resource_all", None)
        if pause is not None:
            pause.argtypes = [ctypes.c_int]
            pause.restype = ctypes.c_int
            return pause  # type: ignore[no-any-return]
    return None


def pool_release_available() -> bool:
    """Whether :func:`release_pool` can free a pool in this process."""
    return _pause_all() is not None


def release_pool() -> bool:
    """Free the calling thread's OpenMP pool (its threads exit; the next parallel region
    makes a new one). Call it only outside any parallel region, on a thread whose work
    has ended. True when the runtime did so."""
    pause = _pause_all()
    return pause is not None and pause(_OMP_PAUSE_HARD) == 0
