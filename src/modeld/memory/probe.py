"""Measure memory: what this process uses (what the budget charges a loaded instance),
and how much there is to budget when ``--vram-budget-mb`` is not given.

The manager samples :meth:`MemoryProbe.used_bytes` before and after a load (one load at a
time) and charges the instance the difference.

``RssProbe`` (CPU): the resident set of this process, from ``/proc/self/statm``. It
counts anonymous pages (KV cache, compute buffers, repacked weights, token tables) *and*
the file-backed pages of mmapped model files that have been touched. Counting those is
the honest choice: generation touches every weight page per token, so evicting them
under pressure only trades RAM for disk reads, and with ``--no-mmap`` the same bytes are
anonymous anyway. ``sample()`` splits the two (``RssAnon``/``RssFile`` from
``/proc/self/status``). Note that RSS growth right after a load is below the estimate
until a long prompt has touched the whole compute buffer.

With ``trim=True`` the probe calls glibc ``malloc_trim(0)`` before sampling, so memory
that ``free`` kept in the allocator's arenas is returned first: what remains after a
model is closed is a leak, not allocator retention.

``NvmlProbe`` (GPU): this process's GPU memory, summed over every device NVML lists
(``nvmlDeviceGetComputeRunningProcesses``). It includes the CUDA context (once per
process). NVML is initialised lazily, on the first sample; NVML errors become
:class:`MemoryProbeError`. Inside a container without the host PID namespace NVML
reports host PIDs: when it lists processes that do not exist here and not this one, the
probe raises rather than report 0. A process that has not created a CUDA context yet
(no GPU instance loaded) correctly measures 0.

:func:`default_budget_mb`: the whole of GPU 0 when offloading (from NVML), otherwise
half of the machine's RAM.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from modeld.errors import MemoryProbeError
from modeld.sizes import MIB

__all__ = [
    "MemoryProbe",
    "MemoryProbeError",
    "NvmlProbe",
    "RssProbe",
    "RssSample",
    "default_budget_mb",
    "detect_probe",
]

_CPU_SHARE = 0.5  # on CPU the budget stands for RAM; leave half to the OS and page cache


@runtime_checkable
class MemoryProbe(Protocol):
    """Memory used by this process on the budgeted device."""

    @property
    def kind(self) -> str:
        """``"rss"`` or ``"nvml"``: shown in ``/status``."""
        ...

    def used_bytes(self) -> int:
        """Bytes used now. Raises :class:`MemoryProbeError` when it cannot measure."""
        ...


@dataclass(frozen=True, slots=True)
class RssSample:
    resident_bytes: int
    anon_bytes: int  # heap, KV cache, compute buffers
    file_bytes: int  # touched pages of mmapped files (model weights)


class RssProbe:
    """Resident set size of this process (Linux ``/proc``)."""

    def __init__(self, *, trim: bool = True, proc_dir: str = "/proc/self") -> None:
        self._trim = trim
        self._proc_dir = proc_dir
        self._page_bytes = os.sysconf("SC_PAGE_SIZE")
        self._malloc_trim: Any = None
        if trim:
            self._malloc_trim = _find_malloc_trim()

    @property
    def kind(self) -> str:
        return "rss"

    def trim(self) -> None:
        """Give memory freed by ``free`` back to the OS (glibc only; a no-op elsewhere)."""
        if self._malloc_trim is not None:
            self._malloc_trim(0)

    def used_bytes(self) -> int:
        if self._trim:
            self.trim()
        try:
            with open(f"{self._proc_dir}/statm", "rb") as statm:
                fields = statm.read().split()
            return int(fields[1]) * self._page_bytes
        except (OSError, IndexError, ValueError) as exc:
            raise MemoryProbeError(f"cannot read resident memory: {exc}") from exc

    def sample(self) -> RssSample:
        """Resident memory split into anonymous and file-backed pages."""
        if self._trim:
            self.trim()
        try:
            with open(f"{self._proc_dir}/status", "rb") as status:
                lines = status.read().decode("ascii", "replace").splitlines()
            values_kib = {
                name: int(rest.split()[0])
                for name, _, rest in (line.partition(":") for line in lines)
                if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem")
            }
            return RssSample(
                resident_bytes=values_kib["VmRSS"] * 1024,
                anon_bytes=values_kib["RssAnon"] * 1024,
                file_bytes=(values_kib["RssFile"] + values_kib.get("RssShmem", 0)) * 1024,
            )
        except (OSError, IndexError, ValueError, KeyError) as exc:
            raise MemoryProbeError(f"cannot read resident memory: {exc}") from exc


def _find_malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None  # not glibc: nothing to trim
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return malloc_trim


class NvmlProbe:
    """GPU memory used by this process, over all devices, via NVML.

    ``nvml`` is the ``pynvml`` module (injectable for tests); ``pid`` defaults to this
    process. Thread-safe; call :meth:`close` to shut NVML down again.
    """

    def __init__(
        self, nvml: ModuleType | None = None, *, pid: int | None = None, proc_root: str = "/proc"
    ) -> None:
        self._nvml = nvml
        self._pid = os.getpid() if pid is None else pid
        self._proc_root = proc_root
        self._lock = threading.Lock()
        self._initialised = False

    @property
    def kind(self) -> str:
        return "nvml"

    def _module(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                raise MemoryProbeError("nvidia-ml-py (pynvml) is not installed") from exc
            self._nvml = pynvml
        return self._nvml

    def _ensure_initialised(self) -> Any:
        nvml = self._module()
        if not self._initialised:
            nvml.nvmlInit()
            self._initialised = True
        return nvml

    def device_count(self) -> int:
        with self._lock, _translated("count GPUs"):
            return int(self._ensure_initialised().nvmlDeviceGetCount())

    def device_total_bytes(self, index: int = 0) -> int:
        """The memory GPU ``index`` has in all (used or not)."""
        with self._lock, _translated(f"read the memory size of GPU {index}"):
            nvml = self._ensure_initialised()
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).total)

    def used_bytes(self) -> int:
        with self._lock, _translated("read GPU memory"):
            nvml = self._ensure_initialised()
            total_bytes = 0
            found = False
            for index in range(int(nvml.nvmlDeviceGetCount())):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if int(process.pid) != self._pid:
                        continue
                    found = True
                    used = process.usedGpuMemory
                    if used is None:
                        raise MemoryProbeError(
                            f"NVML does not report per-process memory on GPU {index} "
                            "(MIG or no permission)"
                        )
                    total_bytes += int(used)
            if not found and self._foreign_pids_listed(nvml):
                raise MemoryProbeError(
                    f"NVML lists GPU processes this process cannot see (pid {self._pid} is "
                    "not among them): a container without the host PID namespace?"
                )
            return total_bytes

    def _foreign_pids_listed(self, nvml: Any) -> bool:
        """True when NVML names PIDs that do not exist here: it speaks another namespace."""
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if not os.path.exists(f"{self._proc_root}/{int(process.pid)}"):
                    return True
        return False

    def close(self) -> None:
        with self._lock:
            if self._initialised and self._nvml is not None:
                self._initialised = False
                with _translated("shut NVML down"):
                    self._nvml.nvmlShutdown()


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Map NVML's exceptions (and OS errors loading it) to MemoryProbeError, once."""
    try:
        yield
    except MemoryProbeError:
        raise
    except Exception as exc:
        is_nvml = any(cls.__name__ == "NVMLError" for cls in type(exc).__mro__)
        if is_nvml or isinstance(exc, OSError):
            raise MemoryProbeError(f"cannot {action}: {exc}") from exc
        raise


def detect_probe(prefer_gpu: bool) -> MemoryProbe:
    """NVML when asked for and it works (pynvml imports, a GPU is listed); else RSS.

    The choice is visible as ``probe.kind``. NVML stays initialised in the returned
    probe; an RSS fallback never initialises anything.
    """
    if prefer_gpu:
        probe = NvmlProbe()
        try:
            if probe.device_count() > 0:
                return probe
        except MemoryProbeError:
            pass
        probe.close()
    return RssProbe()


def default_budget_mb(gpu: bool) -> int:
    """The whole of GPU 0 when offloading, otherwise half of the machine's RAM.

    Without NVML (not installed, no driver, no device) a GPU budget falls back to RAM too.
    """
    if gpu:
        probe = NvmlProbe()
        try:
            return probe.device_total_bytes(0) // MIB
        except MemoryProbeError:
            pass
        finally:
            with contextlib.suppress(MemoryProbeError):
                probe.close()
    ram_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB
    return max(1, int(ram_mb * _CPU_SHARE))
