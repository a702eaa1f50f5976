"""EventHub listeners: synchronous ones during publish, ``soon`` ones right after the
publisher lets the event loop go (a log line and metrics after a request's last line)."""

from __future__ import annotations

import pytest

from modeld.events import Event, EventHub, Listener, ModelLoadStarted, ModelReady


def _hub_with(calls: list[str]) -> EventHub:
    hub = EventHub()

    def named(name: str) -> Listener:
        return lambda event: calls.append(f"{name}:{event.kind}")

    hub.add_listener(named("soon-a"), soon=True)
    hub.add_listener(named("sync"))
    hub.add_listener(named("soon-b"), soon=True)
    return hub


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_soon_listeners_run_in_order_once_the_publisher_lets_the_loop_go() -> None:
    import anyio

    calls: list[str] = []
    hub = _hub_with(calls)
    hub.publish(ModelLoadStarted(model="m.gguf"))
    hub.publish(ModelReady(model="m.gguf", load_ms=1))
    assert calls == ["sync:model_load_started", "sync:model_ready"]
    await anyio.lowlevel.checkpoint()
    assert calls[2:] == [
        "soon-a:model_load_started",
        "soon-b:model_load_started",
        "soon-a:model_ready",
        "soon-b:model_ready",
    ]


def test_without_an_event_loop_soon_listeners_run_at_once() -> None:
    calls: list[str] = []
    event: Event = ModelLoadStarted(model="m.gguf")
    _hub_with(calls).publish(event)
    assert calls == [
        "sync:model_load_started",
        "soon-a:model_load_started",
        "soon-b:model_load_started",
    ]
