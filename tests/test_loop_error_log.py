"""asyncio's exception handler: JSON lines, rate-limited per message, with the count of
what was held back."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from loguru import logger

from modeld.observability.logging import LoopErrorLog


@pytest.fixture
def lines() -> Iterator[list[dict[str, object]]]:
    captured: list[dict[str, object]] = []

    def sink(message: object) -> None:
        record = message.record  # type: ignore[attr-defined]
        captured.append({"message": record["message"], **record["extra"]})

    logger.enable("modeld")
    handler = logger.add(sink, level="ERROR", format="{message}")
    yield captured
    logger.remove(handler)


def test_each_message_is_logged_at_most_once_per_interval(
    lines: list[dict[str, object]],
) -> None:
    now = [0.0]
    handler = LoopErrorLog(every_s=10.0, clock=lambda: now[0])
    accept = {"message": "socket.accept() out of system resource", "exception": OSError(24, "x")}
    for _ in range(1000):  # a second of failing accepts
        handler(None, accept)
        now[0] += 0.001
    handler(None, {"message": "Task exception was never retrieved"})
    assert [line["detail"] for line in lines] == [
        "socket.accept() out of system resource",
        "Task exception was never retrieved",
    ]
    now[0] = 11.0
    handler(None, accept)
    assert lines[-1]["detail"] == "socket.accept() out of system resource"
    assert lines[-1]["suppressed"] == 999
    assert lines[0]["error"] == repr(OSError(24, "x"))
    json.dumps(lines)  # every field is plain JSON
