"""Memory probes: RSS from /proc, NVML through a fake pynvml (no GPU needed), detection."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from modeld.errors import ModeldError
from modeld.memory.probe import (
    MemoryProbe,
    MemoryProbeError,
    NvmlProbe,
    RssProbe,
    default_budget_mb,
    detect_probe,
)
from modeld.sizes import MIB


def test_rss_probe_follows_allocations() -> None:
    probe = RssProbe()
    assert probe.kind == "rss"
    assert isinstance(probe, MemoryProbe)
    before = probe.used_bytes()
    block = b"\x01" * (64 * MIB)  # written, so resident
    grown = probe.used_bytes()
    del block
    after = probe.used_bytes()
    assert grown - before >= 60 * MIB
    assert grown - after >= 60 * MIB  # freed and trimmed back to the OS


def test_rss_sample_splits_anonymous_and_file_pages(tmp_path: Path) -> None:
    probe = RssProbe()
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x02" * (32 * MIB))
    before = probe.sample()
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        checksum = sum(view[offset] for offset in range(0, len(view), mmap.PAGESIZE))
        touched = probe.sample()
    assert checksum == 2 * (32 * MIB // mmap.PAGESIZE)
    assert touched.file_bytes - before.file_bytes >= 30 * MIB
    assert abs(touched.resident_bytes - touched.anon_bytes - touched.file_bytes) < 4 * MIB


def test_rss_probe_without_proc_raises_a_modeld_error(tmp_path: Path) -> None:
    probe = RssProbe(proc_dir=str(tmp_path / "nope"))
    with pytest.raises(MemoryProbeError) as info:
        probe.used_bytes()
    assert isinstance(info.value, ModeldError)
    with pytest.raises(MemoryProbeError):
        probe.sample()


# --- NVML through a fake pynvml ----------------------------------------------------------


class NVMLError(Exception):
    pass


class NVMLError_Uninitialized(NVMLError):  # pynvml names its errors this way
    pass


def fake_nvml(
    devices: list[list[SimpleNamespace]], *, fail_init: bool = False, total_bytes: int = 0
) -> ModuleType:
    """A stand-in for pynvml with ``devices[i]`` = the processes on GPU i, each GPU
    ``total_bytes`` large."""
    module = ModuleType("pynvml")
    calls: list[str] = []
    state = {"initialised": False}

    def nvml_init() -> None:
        calls.append("init")
        if fail_init:
            raise NVMLError_Uninitialized("Driver Not Loaded")
        state["initialised"] = True

    def require_init() -> None:
        if not state["initialised"]:
            raise NVMLError_Uninitialized("Uninitialized")

    def device_count() -> int:
        require_init()
        return len(devices)

    def handle(index: int) -> int:
        require_init()
        return index

    def processes(index: int) -> list[SimpleNamespace]:
        require_init()
        return devices[index]

    def memory_info(index: int) -> SimpleNamespace:
        require_init()
        if index >= len(devices):
            raise NVMLError("Invalid Argument")
        return SimpleNamespace(total=total_bytes)

    def shutdown() -> None:
        calls.append("shutdown")
        state["initialised"] = False

    module.__dict__.update(
        NVMLError=NVMLError,
        nvmlInit=nvml_init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetCount=device_count,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetComputeRunningProcesses=processes,
        nvmlDeviceGetMemoryInfo=memory_info,
        calls=calls,
    )
    return module


def proc(pid: int, used_bytes: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=used_bytes)


def test_nvml_probe_sums_this_process_over_devices() -> None:
    me, other = os.getpid(), os.getppid()
    nvml = fake_nvml([[proc(me, 300 * MIB), proc(other, 5000 * MIB)], [], [proc(me, 20 * MIB)]])
    probe = NvmlProbe(nvml)
    assert nvml.calls == []  # lazy: nothing happens before the first sample
    assert probe.kind == "nvml"
    assert probe.used_bytes() == 320 * MIB
    assert probe.used_bytes() == 320 * MIB
    assert nvml.calls == ["init"]
    probe.close()
    probe.close()
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_probe_before_any_cuda_context_is_zero() -> None:
    nvml = fake_nvml([[proc(os.getppid(), 5000 * MIB)]])  # a visible neighbour only
    assert NvmlProbe(nvml).used_bytes() == 0


def test_nvml_probe_refuses_a_foreign_pid_namespace(tmp_path: Path) -> None:
    nvml = fake_nvml([[proc(4_000_000, 300 * MIB)]])
    with pytest.raises(MemoryProbeError, match="namespace"):
        NvmlProbe(nvml, proc_root=str(tmp_path)).used_bytes()


def test_nvml_probe_without_per_process_numbers_raises() -> None:
    nvml = fake_nvml([[proc(os.getpid(), None)]])
    with pytest.raises(MemoryProbeError, match="per-process"):
        NvmlProbe(nvml).used_bytes()


def test_nvml_errors_are_translated_once() -> None:
    probe = NvmlProbe(fake_nvml([], fail_init=True))
    with pytest.raises(MemoryProbeError, match="Driver Not Loaded") as info:
        probe.used_bytes()
    assert isinstance(info.value.__cause__, NVMLError)
    with pytest.raises(MemoryProbeError):
        probe.device_count()


def test_a_bug_is_not_disguised_as_an_nvml_error() -> None:
    nvml = fake_nvml([[]])
    nvml.__dict__["nvmlDeviceGetComputeRunningProcesses"] = None
    with pytest.raises(TypeError):
        NvmlProbe(nvml).used_bytes()


def test_detect_probe_on_cpu_is_rss() -> None:
    assert detect_probe(prefer_gpu=False).kind == "rss"


def test_detect_probe_uses_nvml_when_a_gpu_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([[]]))
    assert detect_probe(prefer_gpu=True).kind == "nvml"


@pytest.mark.parametrize("devices", [[], None], ids=["no GPU", "no driver"])
def test_detect_probe_falls_back_to_rss(
    monkeypatch: pytest.MonkeyPatch, devices: list[list[SimpleNamespace]] | None
) -> None:
    nvml = fake_nvml(devices or [], fail_init=devices is None)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert detect_probe(prefer_gpu=True).kind == "rss"
    if devices is not None:
        assert nvml.calls == ["init", "shutdown"]


def test_detect_probe_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert detect_probe(prefer_gpu=True).kind == "rss"


def test_detect_probe_on_this_machine() -> None:
    probe = detect_probe(prefer_gpu=True)
    assert probe.used_bytes() >= 0
    if isinstance(probe, NvmlProbe):
        probe.close()


# --- the default budget ------------------------------------------------------------------


def half_of_ram_mb() -> int:
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB * 0.5)


def test_default_budget_on_cpu_is_half_of_ram() -> None:
    assert default_budget_mb(gpu=False) == half_of_ram_mb() > 0


def test_default_budget_on_gpu_is_all_of_gpu_0(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml([[], []], total_bytes=8192 * MIB)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert default_budget_mb(gpu=True) == 8192
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize("nvml", [None, fake_nvml([]), fake_nvml([], fail_init=True)],
                         ids=["no pynvml", "no GPU", "no driver"])  # fmt: skip
def test_default_budget_without_a_gpu_falls_back_to_ram(
    monkeypatch: pytest.MonkeyPatch, nvml: ModuleType | None
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert default_budget_mb(gpu=True) == half_of_ram_mb()
