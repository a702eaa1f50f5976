"""OpenAI's ``n`` ends once, however it ends: an unload or a shutdown between two choices
(before the next starts) or during one is the stream's one terminal event (an ``error``
event, no ``[DONE]``), or the whole answer's error; the choices before it went out with
their own finish chunks. In-process, on the real manager (:class:`EndingManager` times
the early end)."""

from __future__ import annotations

from typing import Any

import pytest

from modeld.types import DoneReason
from tests.api.conftest import TINY_CHAT, AppFactory
from tests.support.openai_clients import sse_data

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _body(path: str, n: int, stream: bool, max_tokens: int = 4) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "n": n, "stream": stream, "seed": 1}
    if path == CHAT:
        body.update(model=TINY_CHAT, messages=[{"role": "user", "content": "hi"}])
    else:
        body.update(model="tiny-a.gguf", prompt="hi")
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _finishes(events: list[object]) -> list[tuple[int, str]]:
    return [
        (choice["index"], choice["finish_reason"])
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices") or []
        if choice["finish_reason"]
    ]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("reason", [DoneReason.EVICTED, DoneReason.SHUTDOWN])
async def test_an_end_between_choices_is_the_streams_one_terminal_event(
    app_factory: AppFactory, path: str, reason: DoneReason
) -> None:
    async with app_factory() as app:
        app.manager.end_between = reason
        response = await app.http.post(path, json=_body(path, 3, stream=True))
        assert response.status_code == 200  # the stream had started
        events = sse_data(response.text)
        assert "[DONE]" not in events
        assert _finishes(events) == [(0, "length")]  # choice 0 ended; no other started
        *chunks, last = events
        assert isinstance(last, dict)
        assert last["error"]["code"] == str(reason), response.text
        assert all("error" not in c for c in chunks if isinstance(c, dict))
        assert not any(isinstance(c, dict) and c.get("usage") for c in chunks)
        assert app.manager.statistics().running == 0
        fine = await app.http.post(path, json=_body(path, 2, stream=True))
        assert sse_data(fine.text)[-1] == "[DONE]"  # the model serves the next


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_an_end_during_the_first_choice_ends_the_stream_at_once(
    app_factory: AppFactory, path: str
) -> None:
    async with app_factory() as app:
        app.manager.end_next = DoneReason.EVICTED
        response = await app.http.post(path, json=_body(path, 3, stream=True, max_tokens=64))
    events = sse_data(response.text)
    assert "[DONE]" not in events
    assert _finishes(events) == []
    last = events[-1]
    assert isinstance(last, dict)
    assert last["error"]["code"] == "evicted"


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_an_end_between_whole_choices_is_the_answers_error(
    app_factory: AppFactory, path: str
) -> None:
    async with app_factory() as app:
        app.manager.end_between = DoneReason.EVICTED
        response = await app.http.post(path, json=_body(path, 3, stream=False))
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "evicted"
