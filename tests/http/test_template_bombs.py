"""A model file whose chat template folds to a huge value when compiled (Jinja evaluates
constant expressions at compile time) loads promptly, in the probe child and in the
server, with the probe and without: llama-cpp-python never sees the template, and
modeld's own compile is bounded. Chat with it is a clean 400; the process does not grow
by the bomb; other models go on serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.types import LoopKind
from tests.support.server import RunningServer, start_modeld
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

BOMBS = {
    # a 1 GB string folded at compile time (llama-cpp-python: ~40 s, +1 GB kept)
    "center-bomb": "{{ 'x'|center(1000000000) }}" + TINY_CHAT_TEMPLATE,
    # a 100-million-digit power folded at compile time (llama-cpp-python: spins for ever)
    "power-bomb": "{{ 10 ** 100000000 }}" + TINY_CHAT_TEMPLATE,
    # '%' formatting with a huge width, folded through the format filter
    "format-bomb": "{{ '%0999999999d'|format(1) }}" + TINY_CHAT_TEMPLATE,
}
HELLO = [{"role": "user", "content": "hello"}]
# Far under what any bomb takes (tens of seconds to for ever), far over a tiny load.
PROMPT_S = 30.0
MAX_GROWTH_BYTES = 300 * 1024 * 1024


def _rss_bytes(server: RunningServer) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def bomb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("template-bombs")
    for name, template in BOMBS.items():
        write_tiny_gguf(directory / f"{name}.gguf", TinyModelSpec(seed=2, chat_template=template))
    write_tiny_gguf(
        directory / "tiny-chat.gguf", TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE)
    )
    return directory


@pytest.fixture(scope="module", params=["probe", "no-probe"])
def server(
    request: pytest.FixtureRequest, bomb_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    flags = ["--no-probe-load"] if request.param == "no-probe" else []
    running = start_modeld(
        bomb_dir, tmp_path_factory.mktemp("bomb-logs"), "--threads", "1", "--n-ctx", "256",
        "--token-loop", str(LoopKind.C), *flags,
    )  # fmt: skip
    yield running
    running.stop()


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_template_bomb_loads_promptly_and_its_chat_is_a_clean_400(
    server: RunningServer, bomb: str
) -> None:
    model = f"{bomb}.gguf"
    before = _rss_bytes(server)
    with server.client(timeout_s=PROMPT_S) as http:
        completion = http.post(
            "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}
        )
        assert completion.status_code == 200, completion.text  # loaded, probe included
        chat = http.post("/v1/chat/completions",
                         json={"model": model, "messages": HELLO, "max_tokens": 2})  # fmt: skip
        assert chat.status_code == 400, chat.text
        error = chat.json()["error"]
        assert error["code"] == "chat_template_error"
        assert "forbids" in error["message"]
        fine = {"model": "tiny-chat.gguf", "messages": HELLO, "max_tokens": 2}
        other = http.post("/v1/chat/completions", json=fine)
        assert other.status_code == 200, other.text
        assert http.delete(f"/models/{model}/instance").status_code == 200
    assert _rss_bytes(server) - before < MAX_GROWTH_BYTES
    assert server.process.poll() is None
    assert "Traceback" not in server.log()


def test_llama_cpp_python_never_sees_the_template(bomb_dir: Path) -> None:
    """The engine's ``Llama`` has no template in the metadata llama-cpp-python reads (so
    it builds no formatter); modeld's copy keeps it."""
    from modeld.engine.llama_load import load_llama

    path = str(bomb_dir / "tiny-chat.gguf")
    llama = load_llama(path, "tiny-chat.gguf", model_path=path, n_ctx=64, verbose=False)
    try:
        assert "tokenizer.chat_template" not in llama.metadata
        assert llama.file_metadata["tokenizer.chat_template"] == TINY_CHAT_TEMPLATE
        assert not any(name.startswith("chat_template") for name in llama._chat_handlers)
    finally:
        llama.close()
