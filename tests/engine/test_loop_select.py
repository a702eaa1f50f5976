"""token_loop(): the C loop or the twin, and a clear refusal instead of a silent fallback."""

from __future__ import annotations

import subprocess
import sys

import llama_cpp
import pytest
from llama_cpp import Llama

from modeld.engine.cloop import SUPPORTED_LLAMA_CPP_VERSION, CTokenLoop
from modeld.engine.pyloop import PythonTokenLoop
from modeld.engine.select import token_loop
from modeld.errors import TokenLoopUnavailable
from modeld.types import LoopKind, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def test_each_kind_gets_its_loop() -> None:
    c_loop, py_loop = token_loop(LoopKind.C), token_loop(LoopKind.PYTHON)
    assert isinstance(c_loop, CTokenLoop)
    assert c_loop.kind is LoopKind.C
    assert isinstance(py_loop, PythonTokenLoop)
    assert py_loop.kind is LoopKind.PYTHON
    assert isinstance(token_loop("c"), CTokenLoop)  # type: ignore[arg-type]


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="'cuda'"):
        token_loop("cuda")  # type: ignore[arg-type]


def test_other_llama_cpp_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert llama_cpp.__version__ == SUPPORTED_LLAMA_CPP_VERSION
    monkeypatch.setattr(llama_cpp, "__version__", "0.3.99")
    with pytest.raises(
        TokenLoopUnavailable, match=r"written for llama-cpp-python 0\.3\.36"
    ) as info:
        token_loop(LoopKind.C)
    assert "'python'" in info.value.message
    assert info.value.code == "token_loop_unavailable"


def test_missing_extension_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "modeld.engine._tokenloop", None)
    with pytest.raises(TokenLoopUnavailable, match=r"not built or cannot be imported.*'python'"):
        token_loop(LoopKind.C)


def test_library_not_loaded_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp.llama_cpp._lib, "_name", "/nonexistent/libllama.so")
    with pytest.raises(TokenLoopUnavailable, match="is not loaded in this process"):
        token_loop(LoopKind.C)


def test_library_without_the_functions_is_refused() -> None:
    """In a fresh interpreter, so that nothing is bound yet: libc has no llama_* symbols."""
    code = (
        "import ctypes, ctypes.util\n"
        "from modeld.engine import _tokenloop\n"
        "path = ctypes.util.find_library('c')\n"
        "ctypes.CDLL(path)\n"
        "try:\n"
        "    _tokenloop.bind(path)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "llama.cpp function llama_batch_get_one not found" in result.stdout


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [([], ValueError, "at least one token"), ([1, -5], ValueError, "out of range")],
)
def test_c_loop_refuses_bad_prompts(
    tiny_llama: Llama, prompt: list[int], error: type[Exception], match: str
) -> None:
    loop = token_loop(LoopKind.C)
    ring = loop.new_ring()
    with pytest.raises(error, match=match):
        loop.run(tiny_llama, ring, prompt, GREEDY)
    ring.close()


def test_c_loop_refuses_a_python_ring(tiny_llama: Llama) -> None:
    ring = PythonTokenLoop().new_ring()
    with pytest.raises(TypeError, match="new_ring"):
        token_loop(LoopKind.C).run(tiny_llama, ring, [1, 2], GREEDY)
    ring.close()
