"""Helpers for driving modeld with the real ``openai`` client (3.51)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai

from tests.support.server import RunningServer
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

__all__ = [
    "TINY_CHAT",
    "answered",
    "openai_client",
    "sse_data",
    "write_chat_models",
]

TINY_CHAT = "tiny-chat.gguf"


_OPEN_CLIENTS: list[openai.OpenAI] = []


def openai_client(server: RunningServer, max_retries: int = 2) -> openai.OpenAI:
    """The client as users make it: any key (modeld accepts every Bearer by default).
    Kept until the session ends (:func:`close_openai_clients`): a client left to the
    garbage collector closes its sockets with a ResourceWarning in whichever test runs
    then, and fixtures of any scope share this helper."""
    client = openai.OpenAI(
        base_url=server.base_url + "/v1", api_key="sk-anything", max_retries=max_retries
    )
    _OPEN_CLIENTS.append(client)
    return client


def close_openai_clients() -> None:
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


def write_chat_models(directory: Path) -> Path:
    """``tiny-chat.gguf`` (with a chat template) beside the plain tiny models."""
    write_tiny_gguf(directory / TINY_CHAT, TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE))
    return directory


def answered(server: RunningServer, path: str, status: int) -> int:
    """How many requests to ``path`` were answered with ``status`` (from /metrics): the
    attempts the client made, retries included."""
    with server.client() as client:
        text = client.get("/metrics").text
    pattern = re.compile(
        r'^modeld_http_requests_total\{(?=[^}]*path="' + re.escape(path) + r'")'
        r'(?=[^}]*status="' + str(status) + r'")[^}]*\} ([0-9.]+)$',
        re.MULTILINE,
    )
    return sum(int(float(match)) for match in pattern.findall(text))


def sse_data(text: str) -> list[object]:
    """The ``data:`` payloads of an SSE body, ``[DONE]`` as the string itself."""
    events = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
