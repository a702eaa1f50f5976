"""How much memory there is to budget when ``--vram-budget-mb`` is not given."""

from __future__ import annotations

import contextlib
import os

__all__ = ["default_budget_mb", "gpu_offload_available"]

_CPU_SHARE = 0.5  # on CPU the budget stands for RAM; leave half to the OS and page cache


def gpu_offload_available() -> bool:
    """True when this llama.cpp build can offload layers to a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _system_ram_mb() -> int:
    pages = os.sysconf("SC_PHYS_PAGES")
    page_size = os.sysconf("SC_PAGE_SIZE")
    return int(pages * page_size // (1024 * 1024))


def _gpu_total_mb() -> int | None:
    with contextlib.suppress(Exception):  # NVML missing or no device: fall back to RAM
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024))
        finally:
            pynvml.nvmlShutdown()
    return None


def default_budget_mb(gpu: bool) -> int:
    """The whole of GPU 0 when offloading, otherwise half of the machine's RAM."""
    if gpu:
        total = _gpu_total_mb()
        if total is not None:
            return total
    return max(1, int(_system_ram_mb() * _CPU_SHARE))
