"""Workarounds for llama.cpp CPU-backend faults that no model file can be blamed for.

On CPUs with AMX (Intel Sapphire Rapids and later), the llama.cpp that llama-cpp-python
0.3.36 vendors places quantized weights in its AMX buffer type, and its AMX matrix
multiply crashes the process (SIGSEGV in ``ggml_backend_amx_mul_mat``) on Gemma 3's
Q4_K_M weights: seen on a 2-core Sapphire Rapids VM, with llama-cpp-python alone (no
modeld code), on the first decode. A crash in one model kills every model in modeld's
process, and the probe load quarantines a good file, so where the CPU backend reports
AMX, llama.cpp's extra weight buffer types (AMX and the repacked layouts) are turned off
for every model this process creates: weights stay in plain CPU buffers, which every
kernel handles. ``MODELD_CPU_EXTRA_BUFFERS=1`` keeps them (a llama.cpp build where AMX
works); ``=0`` turns them off on any CPU.

This changes ``llama_model_default_params()`` for the whole process (the only hook
``llama_cpp.Llama`` offers before it loads the weights), so raw ``Llama`` references in
tests and benchmarks that import this module run the same kernels as modeld's models.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_c

__all__ = ["apply_cpu_quirks", "extra_buffers_enabled"]

_ENV = "MODELD_CPU_EXTRA_BUFFERS"


@functools.cache
def extra_buffers_enabled() -> bool:
    """Whether llama.cpp may place weights in its extra (AMX, repacked) buffer types."""
    chosen = os.environ.get(_ENV, "").strip()
    if chosen in ("0", "1"):
        return chosen == "1"
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    return "AMX_INT8 = 1" not in info


@functools.cache
def apply_cpu_quirks() -> None:
    """Idempotent; called before any model is loaded (importing the engine does it)."""
    if extra_buffers_enabled():
        return
    defaults: Callable[[], Any] = llama_c.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_c.llama_model_default_params = without_extra_buffers
    llama_cpp.llama_model_default_params = without_extra_buffers
