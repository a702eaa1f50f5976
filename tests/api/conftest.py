"""The app in-process, through ``httpx.ASGITransport``: every protocol's decode, framing
and errors on a real manager and real tiny models, without starting a server.

The manager is the real one; :class:`EndingManager` only lets a test end the next
generation early with a reason of its choosing (what an eviction or a shutdown does to
it), at once or between two choices, so that the early end never races the
generation's own end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger

from modeld.api.app import create_app
from modeld.events import Event, GenerationFinished
from modeld.scheduling.choices import ChoiceRun
from modeld.scheduling.manager import ModelManager
from modeld.settings.config import load_settings
from modeld.types import ChatRequest, DoneReason, InferRequest
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

__all__ = ["KEY", "TINY_CHAT", "App", "AppFactory", "EndingManager", "LogRecords"]

TINY_CHAT = "tiny-chat.gguf"
KEY = "sk-in-process-key"
LogRecords = list[dict[str, Any]]


@pytest.fixture
def anyio_backend() -> str:
    """The app runs under asyncio here (trio is covered by the scheduling suite)."""
    return "asyncio"


class EndingManager(ModelManager):
    """The real manager; ``end_next`` ends the next request's run as soon as it starts
    (what an eviction does to its running choice), ``end_between`` ends the next
    request's run when its first choice has ended, before the next starts (an eviction
    between two choices); ``requests`` keeps every request it was asked to generate
    (what a protocol decoded)."""

    end_next: DoneReason | None = None
    end_between: DoneReason | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[InferRequest | ChatRequest] = []
        self._between: dict[str, tuple[ChoiceRun, DoneReason]] = {}
        self.events.add_listener(self._on_event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, GenerationFinished) and event.result.request_id in self._between:
            run, reason = self._between.pop(event.result.request_id)
            run.cancel(reason)  # on the event loop, as the choice's result comes in

    @asynccontextmanager
    async def choices(  # type: ignore[override]
        self, request: InferRequest | ChatRequest, count: int, *, request_id: str | None = None
    ) -> AsyncIterator[ChoiceRun]:
        self.requests.append(request)
        async with super().choices(request, count, request_id=request_id) as run:
            if self.end_next is not None:
                run.cancel(self.end_next)
                self.end_next = None
            if self.end_between is not None:
                self._between[run.request_id] = (run, self.end_between)
                self.end_between = None
            yield run


@pytest.fixture(scope="session")
def api_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain tiny model and one with a chat template."""
    directory = tmp_path_factory.mktemp("api-models")
    write_tiny_gguf(directory / "tiny-a.gguf", TinyModelSpec(seed=0))
    write_tiny_gguf(directory / TINY_CHAT, TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE))
    return directory


@dataclass(frozen=True)
class App:
    http: httpx.AsyncClient
    manager: EndingManager


AppFactory = Callable[..., AbstractAsyncContextManager[App]]


@pytest.fixture
def app_factory(api_models_dir: Path) -> AppFactory:
    """``async with app_factory(**flags) as app:`` the app on a fresh manager, entered
    (``httpx.ASGITransport`` runs no lifespan), and an httpx client of it."""

    @asynccontextmanager
    async def serve(**flags: str) -> AsyncIterator[App]:
        settings = load_settings(
            {
                "models_dir": str(api_models_dir),
                "default_model": TINY_CHAT,
                "threads": "1",
                "n_ctx": "256",
                **flags,
            },
            env={},
        )
        manager = EndingManager(settings)
        app = create_app(settings, manager)
        async with manager:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1", timeout=60
            ) as http:
                yield App(http, manager)

    return serve


@pytest.fixture
def log_records() -> Iterator[LogRecords]:
    """Every log record written while the test runs (message and bound fields)."""
    records: LogRecords = []

    def sink(message: Any) -> None:
        record = message.record
        records.append({"message": record["message"], **record["extra"]})

    logger.enable("modeld")  # a library is quiet unless asked (the server asks)
    sink_id = logger.add(sink, level="DEBUG")
    try:
        yield records
    finally:
        logger.remove(sink_id)
        logger.disable("modeld")
