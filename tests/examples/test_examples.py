"""The scripts in examples/ run as the README and their docstrings say, against real
models: a broken example is a broken promise to whoever copies it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import RunningServer, start_modeld

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GEMMA = "gemma-3-270m-q4_k_m.gguf"


def run_example(name: str, *args: str, url: str | None = None) -> str:
    env = {**os.environ, **({"MODELD_URL": url} if url else {})}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def gemma_dir(tmp_path: Path, gemma_path: Path) -> Path:
    directory = tmp_path / "gemma"
    directory.mkdir()
    os.link(gemma_path, directory / GEMMA)
    return directory


@pytest.fixture
def demo_like_server(gemma_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """What ``modeld serve --demo`` configures (alias and template), on a free port."""
    config = tmp_path / "modeld.toml"
    config.write_text(f'[models."{GEMMA}"]\naliases = ["gemma"]\nchat_template = "gemma"\n')
    server = start_modeld(
        gemma_dir, tmp_path, "--config", str(config), "--default-model", GEMMA,
        "--threads", "2", "--n-ctx", "1024",
    )  # fmt: skip
    yield server
    server.stop()


def test_library_stream_streams_from_two_models(models_dir: Path) -> None:
    out = run_example("library_stream.py", str(models_dir), "tiny-a.gguf", "tiny-b.gguf")
    headers = [line for line in out.splitlines() if line.startswith("--- ")]
    assert sorted(header.split()[1] for header in headers) == ["tiny-a.gguf", "tiny-b.gguf"]
    assert all("(length, " in header for header in headers), headers


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_library_chat_chats_answers_in_json_and_embeds(gemma_dir: Path, backend: str) -> None:
    out = run_example("library_chat.py", str(gemma_dir), backend)
    structured = next(line for line in out.splitlines() if line.startswith("structured: "))
    assert isinstance(json.loads(structured.removeprefix("structured: "))["sea"], str)
    assert "640 dimensions; cosine " in out


@pytest.mark.slow
def test_the_openai_client_example(demo_like_server: RunningServer) -> None:
    out = run_example("openai_client.py", url=demo_like_server.base_url)
    assert "completion_tokens=" in out  # the usage chunk
    assert "name=" in out  # the parsed Pydantic model
    assert "depth_m=" in out
    assert out.rstrip().endswith("640 dimensions")


@pytest.mark.slow
def test_the_http_client_example(demo_like_server: RunningServer) -> None:
    out = run_example("http_client.py", "The capital of France is", url=demo_like_server.base_url)
    assert "\n[length] {" in out or "\n[stop] {" in out, out


@pytest.mark.slow
def test_the_ollama_client_example(demo_like_server: RunningServer) -> None:
    out = run_example("ollama_client.py", url=demo_like_server.base_url)
    lines = out.splitlines()
    assert lines[0] == f"{GEMMA}:latest gemma3 268.10M Q4_K_M"
    assert any(re.fullmatch(r"\[(length|stop)\] \d+ tokens in \d+ ns", line) for line in lines), out
    parsed = next(line for line in lines if line.startswith("{'name': "))
    assert "'depth_m': " in parsed
    assert out.rstrip().endswith("640 dimensions")
