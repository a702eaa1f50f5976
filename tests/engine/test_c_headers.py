"""The C that runs without the GIL stays pure C: the headers in ``engine/csrc`` never use
the Python C API, and each compiles on its own without Python's headers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "src" / "modeld" / "engine" / "csrc"
HEADERS = sorted(CSRC.glob("*.h"))
_COMMENTS_AND_STRINGS = re.compile(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"', re.DOTALL)
_PYTHON_API = re.compile(r"\bPython\.h\b|\b_?Py[A-Za-z_]\w*")
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
# What the extension compiles with (setup.py), less the warnings a header's unused
# static functions give when it is compiled alone.
_CC_FLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function"]
_CC_FLAGS += ["-Wno-unused-variable", "-fsyntax-only", "-x", "c"]


def python_api_uses(source: str) -> list[str]:
    """Python C API names in C source, outside comments (string literals included: a
    ``#include "Python.h"`` is one)."""
    code = _COMMENTS_AND_STRINGS.sub(
        lambda match: match.group(0) if match.group(0).startswith('"') else " ", source
    )
    return _PYTHON_API.findall(code)


def compile_alone(header: Path) -> subprocess.CompletedProcess[str]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    return subprocess.run(
        [compiler, *_CC_FLAGS, str(header)], capture_output=True, text=True, check=False
    )


def test_the_pure_c_headers_are_there() -> None:
    names = {header.name for header in HEADERS}
    assert {"llama_api.h", "ring.h", "text_assembler.h", "loop.h"} <= names


@pytest.mark.parametrize("header", HEADERS, ids=lambda path: path.name)
def test_header_uses_no_python_c_api(header: Path) -> None:
    source = header.read_text()
    assert python_api_uses(source) == []
    for name in _LOCAL_INCLUDE.findall(source):
        assert (CSRC / name).is_file(), f"{header.name} includes {name}, not a csrc header"


@pytest.mark.parametrize("header", HEADERS, ids=lambda path: path.name)
def test_header_compiles_without_python(header: Path) -> None:
    result = compile_alone(header)
    assert result.returncode == 0, result.stderr


def test_the_checks_catch_python_in_a_header(tmp_path: Path) -> None:
    leaky = tmp_path / "leaky.h"
    leaky.write_text(
        "/* PyMem_RawFree in a comment is fine */\n"
        "static void *grab(void) { return PyMem_RawMalloc(8); }\n"
    )
    assert python_api_uses(leaky.read_text()) == ["PyMem_RawMalloc"]
    assert python_api_uses('#include "Python.h"\n') == ["Python.h"]
    assert compile_alone(leaky).returncode != 0
