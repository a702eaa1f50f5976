"""One owner thread per llama context, enforced: an engine called from any other thread
refuses at once, before llama.cpp is touched, and stays usable by its owner."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from modeld.engine.base import NotOwnerThread, StopCode, TokenLoop
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.engine.worker import EngineWorker
from modeld.types import SamplingParams

SETTINGS = EngineSettings(n_ctx=256, n_batch=64, n_threads=1, n_gpu_layers=0)
GREEDY = SamplingParams(max_tokens=2, temperature=0.0)


def on_another_thread(call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` on a fresh thread; what it raised (None if nothing)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed back to the test
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    return raised[0] if raised else None


def test_every_call_from_another_thread_is_refused(tiny_model_path: Path, loop: TokenLoop) -> None:
    engine = LlamaEngine(tiny_model_path, SETTINGS, loop, 512, label="tiny-a.gguf")
    tokens = engine.prepare("hello", 2)
    ring = engine.new_ring()  # any thread may make a ring
    calls: dict[str, Callable[[], object]] = {
        "prepare": lambda: engine.prepare("hello", 2),
        "tokenize": lambda: engine.tokenize("hello"),
        "generate": lambda: engine.generate(ring, tokens, GREEDY),
        "warm_up": engine.warm_up,
        "close": engine.close,
    }
    for name, call in calls.items():
        error = on_another_thread(call)
        assert isinstance(error, NotOwnerThread), (name, error)
        assert "tiny-a.gguf" in str(error)
    assert not ring.drain()[2]  # the refused generate never ran, so never finished it
    ring.close()
    # Nothing was touched: the owner still generates, then closes.
    ring = engine.new_ring()
    assert engine.generate(ring, tokens, GREEDY).stop_code is StopCode.LENGTH
    ring.close()
    engine.close()


@pytest.mark.anyio
async def test_an_engine_made_on_its_worker_refuses_the_event_loop(
    tiny_model_path: Path, loop: TokenLoop
) -> None:
    """As the scheduler uses it: made on the worker, so the event loop's thread (or any
    thread-pool thread) calling it directly is refused."""
    worker = EngineWorker("modeld:test")
    engine = await worker.run(lambda: LlamaEngine(tiny_model_path, SETTINGS, loop, 512))
    with pytest.raises(NotOwnerThread):
        engine.tokenize("hello")
    with pytest.raises(NotOwnerThread):
        await anyio.to_thread.run_sync(lambda: engine.prepare("hello", 2))
    assert await worker.run(lambda: engine.tokenize("hello"))
    await worker.run(engine.close)
    await worker.shutdown()
