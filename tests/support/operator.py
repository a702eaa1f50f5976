"""Helpers for the operator tests: log lines as records, an app served in-process."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from hypercorn.asyncio import serve as hypercorn_serve
from starlette.types import ASGIApp

from modeld.server import hypercorn_config
from modeld.settings.config import load_settings
from tests.support.http import poll
from tests.support.server import RunningServer, free_port

__all__ = ["audit_lines", "log_records", "serving"]


def log_records(server: RunningServer) -> list[dict[str, object]]:
    """The server's JSON log lines (anything else in the log is a failure)."""
    records = []
    for line in server.log().splitlines():
        if line.strip():
            record = json.loads(line)
            assert isinstance(record, dict), line
            records.append(record)
    return records


def audit_lines(server: RunningServer) -> list[dict[str, object]]:
    return [r for r in log_records(server) if r.get("audit") is True]


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """The app on Hypercorn in a thread, on 127.0.0.1 and a free port; its base URL."""
    settings = load_settings({"port": str(free_port())}, env={})
    ready: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    started = threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        ready.append((asyncio.get_running_loop(), stop))
        started.set()
        await hypercorn_serve(app, hypercorn_config(settings), shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    url = f"http://127.0.0.1:{settings.port}"
    poll(lambda: _answers(url), bool)
    try:
        yield url
    finally:
        loop, stop = ready[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
