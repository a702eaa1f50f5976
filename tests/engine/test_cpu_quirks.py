"""The AMX workaround: llama.cpp's extra weight buffers off where the CPU backend reports
AMX (its AMX matmul crashed Gemma's Q4_K weights), or as ``MODELD_CPU_EXTRA_BUFFERS`` says."""

from __future__ import annotations

import os
import subprocess
import sys

import llama_cpp
import pytest

_PROBE = (
    "import llama_cpp\n"
    "from modeld.engine.cpu_quirks import apply_cpu_quirks\n"
    "apply_cpu_quirks(); apply_cpu_quirks()\n"
    "print(llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts,"
    " llama_cpp.llama_model_default_params().use_extra_bufts)\n"
)


def _defaults_with(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MODELD_CPU_EXTRA_BUFFERS"}
    if env_value is not None:
        env["MODELD_CPU_EXTRA_BUFFERS"] = env_value
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(("value", "expected"), [("0", "False False"), ("1", "True True")])
def test_the_environment_decides_when_set(value: str, expected: str) -> None:
    assert _defaults_with(value) == expected


def test_by_default_extra_buffers_are_off_exactly_where_the_cpu_backend_has_amx() -> None:
    has_amx = b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
    assert _defaults_with(None) == ("False False" if has_amx else "True True")


def test_an_unknown_value_is_the_default() -> None:
    assert _defaults_with("yes") == _defaults_with(None)
