"""Hostile vocabularies and tensor layouts: what raw llama.cpp does with each (measured in
a child process, since some abort it), and that the validator refuses each first."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modeld.errors import ModelInvalid
from modeld.gguf import read_gguf_header
from tests.support.hostile_models import HOSTILE_MODELS, PROBE_ONLY_MODELS, write_hostile
from tests.support.tiny_gguf import TinyModelSpec, tiny_vocab, write_tiny_gguf

_RAW_LLAMA = r"""
import sys
import llama_cpp
llama = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
for text in sys.argv[2:]:
    llama.tokenize(text.encode())
print("served", flush=True)
"""

WHY = {
    "spm-three-tokens": "lacks byte tokens <0x00>",
    "spm-byte-token-renamed": "lacks byte tokens <0xBC>",
    "spm-byte-token-lower-case": "lacks byte tokens <0xBC>",
    "spm-byte-token-text-AB": "token 68 is a BYTE token but its text is not <0xNN>",
    "spm-duplicate-token": "tokens 265 and 266 are both",
    "wpm-byte-tokens": "BYTE token, which a 'bert' vocabulary cannot have",
    "tensor-missing": "missing tensor 'blk.1.attn_k.weight'",
    "tensor-wrong-shape": r"'blk.0.ffn_up.weight' has shape \[32, 128\], expected \[64, 128\]",
    "tensor-overlap": "'blk.1.attn_v.weight' .* overlaps tensor 'blk.1.attn_k.weight'",
    "split-part": "part of a split model",
}


def raw_llama(path: Path, *texts: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _RAW_LLAMA, str(path), *texts],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hostile")
    for name in [*HOSTILE_MODELS, *PROBE_ONLY_MODELS]:
        write_hostile(directory, name)
    return directory


def test_every_hostile_model_has_a_reason() -> None:
    assert set(WHY) == set(HOSTILE_MODELS)


@pytest.mark.parametrize("name", sorted(HOSTILE_MODELS))
def test_the_validator_refuses_it(hostile_dir: Path, name: str) -> None:
    with pytest.raises(ModelInvalid, match=WHY[name]) as info:
        read_gguf_header(hostile_dir / f"{name}.gguf")
    assert f"{name}.gguf" in info.value.message


@pytest.mark.parametrize("name", sorted(HOSTILE_MODELS))
def test_what_raw_llama_cpp_does_with_it(hostile_dir: Path, name: str) -> None:
    """Why the checks exist: each of these aborts llama.cpp or is refused by it, with
    prompts that need byte fallback (``café``) and ones that do not."""
    expected = HOSTILE_MODELS[name][1]
    plain = raw_llama(hostile_dir / f"{name}.gguf", "hello")
    accented = raw_llama(hostile_dir / f"{name}.gguf", "hello", "café ü")
    if expected == "abort":
        assert accented.returncode == -signal.SIGABRT, accented.stderr[-2000:]
    else:
        assert plain.returncode == 1, plain.stderr[-2000:]
        assert "ValueError: Failed to load model" in plain.stderr


def test_a_renamed_byte_token_serves_ascii_then_aborts(hostile_dir: Path) -> None:
    """The worst one (issue 11, 1c): it loads and answers, and the first prompt with a
    byte it lacks kills the process."""
    path = hostile_dir / "spm-byte-token-renamed.gguf"
    assert raw_llama(path, "hello world").stdout.strip() == "served"
    assert raw_llama(path, "hello", "ü").returncode == -signal.SIGABRT


def test_the_probe_only_model_passes_every_static_check_and_still_aborts(
    hostile_dir: Path,
) -> None:
    """Left to the probe load on purpose: its normalisation table (XCDA) is only wrong
    for bytes of 0x80 and above, which no static check walks."""
    path = hostile_dir / "t5-hostile-charsmap.gguf"
    assert read_gguf_header(path).n_vocab == len(tiny_vocab()[0])
    assert raw_llama(path, "warm up").stdout.strip() == "served"
    aborted = raw_llama(path, "café")
    assert aborted.returncode == -signal.SIGABRT
    assert "Index out of array bounds in XCDA array" in aborted.stderr


def test_byte_fallback_accepts_the_raw_byte_form(tmp_path: Path) -> None:
    """llama.cpp falls back from ``<0xNN>`` to the one-byte string: either will do."""
    tokens, types = tiny_vocab()
    tokens[3 + 0x41] = "A"  # "<0x41>" replaced by the raw byte
    types[3 + 0x41] = 1
    spec = TinyModelSpec(vocab=(tuple(tokens), tuple(types)))
    path = write_tiny_gguf(tmp_path / "raw.gguf", spec)
    assert read_gguf_header(path).n_vocab == len(tokens)
    assert raw_llama(path, "hello", "A café ü").stdout.strip() == "served"


def test_an_empty_token_counts_as_llama_cpps_placeholder(tmp_path: Path) -> None:
    tokens, types = tiny_vocab()
    tokens[-1] = ""
    tokens[-2] = f"[EMPTY_{len(tokens) - 1}]"  # what llama.cpp renames the empty one to
    spec = TinyModelSpec(vocab=(tuple(tokens), tuple(types)))
    path = write_tiny_gguf(tmp_path / "e.gguf", spec)
    with pytest.raises(ModelInvalid, match="are both"):
        read_gguf_header(path)
    assert raw_llama(path, "hello").returncode == -signal.SIGABRT


def test_real_models_pass(gemma_path: Path, tiny_model_path: Path) -> None:
    assert read_gguf_header(gemma_path).n_vocab == 262144
    assert read_gguf_header(tiny_model_path).n_vocab == len(tiny_vocab()[0])
