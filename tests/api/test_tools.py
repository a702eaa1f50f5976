"""Tool calling through the HTTP protocols, in-process (``httpx.ASGITransport``), with the
real ``openai`` and ``ollama`` clients on tiny random-weight models carrying each family's
chat template: forced calls are schema-valid, streamed and not; a full loop; ``auto``
never leaks a call into content; bad input is a 400 naming the field before any model is
touched; ``/api/show`` says the format."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from modeld.api.app import create_app
from modeld.scheduling.manager import ModelManager
from modeld.settings.config import load_settings
from modeld.types import ChatRequest
from tests.support.chat_templates import GEMMA3
from tests.support.http import link_or_copy
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf
from tests.support.tool_templates import HERMES, LLAMA3, MISTRAL

pytestmark = pytest.mark.anyio

MODELS = {
    "hermes": ("tiny-hermes.gguf", HERMES),
    "llama3": ("tiny-llama3.gguf", LLAMA3),
    "mistral": ("tiny-mistral.gguf", MISTRAL),
    "generic": ("tiny-chat.gguf", TINY_CHAT_TEMPLATE),
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "pattern": "^[A-Za-z ]{1,10}$"},
                "days": {"type": "integer", "enum": [1, 2, 3]},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
# The ollama client's Tool type keeps only type, items, description and enum of a
# property (no pattern): its city is one of a few names.
CITY = {"type": "string", "enum": ["Paris", "Rome"]}
OLLAMA_WEATHER = {
    "type": "function",
    "function": {
        **WEATHER["function"],  # type: ignore[dict-item]
        "parameters": {
            "type": "object",
            "properties": {"city": CITY, "days": {"type": "integer", "enum": [1, 2, 3]}},
            "required": ["city", "days"],
        },
    },
}
OLLAMA_TOOLS = [OLLAMA_WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tool_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tool-models")
    for file, template in MODELS.values():
        write_tiny_gguf(
            directory / file, TinyModelSpec(seed=4, chat_template=template, context_length=4096)
        )
    return directory


class Served:
    def __init__(self, manager: ModelManager, transport: httpx.ASGITransport) -> None:
        self.manager = manager
        self.openai = openai.AsyncOpenAI(
            base_url="http://127.0.0.1/v1",
            api_key="sk-any",
            http_client=httpx.AsyncClient(transport=transport, timeout=120),
            max_retries=0,
        )
        self.ollama = ollama.AsyncClient(host="http://127.0.0.1", transport=transport)
        self.http = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120)


async def _serve(models_dir: Path, **flags: str) -> AsyncIterator[Served]:
    settings = load_settings(
        {"models_dir": str(models_dir), "threads": "1", "n_ctx": "4096", **flags}, env={}
    )
    manager = ModelManager(settings)
    async with manager:
        served = Served(manager, httpx.ASGITransport(app=create_app(settings, manager)))
        try:
            yield served
        finally:
            await served.http.aclose()
            await served.openai.close()


@pytest.fixture
async def served(tool_models: Path) -> AsyncIterator[Served]:
    async for one in _serve(tool_models):
        yield one


def _valid(name: str, arguments: dict[str, Any]) -> None:
    """A call of one of TOOLS whose arguments match its schema."""
    if name == "get_weather":
        assert set(arguments) == {"city", "days"}, arguments
        assert re.fullmatch(r"[A-Za-z ]{1,10}", arguments["city"]), arguments  # (or enum)
        assert arguments["days"] in (1, 2, 3)
    else:
        assert name == "get_time", name
        assert arguments == {"zone": arguments["zone"]}
        assert arguments["zone"] in ("UTC", "CET")


SAMPLE = {"max_tokens": 200, "temperature": 0.9, "seed": 5}


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("stream", [False, True])
async def test_required_gives_a_schema_valid_call_through_openai(
    served: Served, family: str, stream: bool
) -> None:
    model = MODELS[family][0]
    choice: Any = "required"
    if stream:  # a named function, streamed
        choice = {"type": "function", "function": {"name": "get_time"}}
    create = served.openai.chat.completions.create
    kwargs: dict[str, Any] = dict(
        model=model, messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False
    )
    if not stream:
        answer = await create(**kwargs, **SAMPLE)
        message = answer.choices[0]
        assert message.finish_reason == "tool_calls"
        assert message.message.content is None
        calls = message.message.tool_calls
        assert calls is not None
        assert len(calls) == 1
        assert re.fullmatch(r"call_[0-9a-f]+", calls[0].id)
        assert calls[0].type == "function"
        _valid(calls[0].function.name, json.loads(calls[0].function.arguments))
        return
    events = [event async for event in await create(**kwargs, **SAMPLE, stream=True)]
    pieces = [c.delta.tool_calls for e in events for c in e.choices if c.delta.tool_calls]
    content = "".join(c.delta.content or "" for e in events for c in e.choices)
    assert content == ""
    head, *fragments = [p for piece in pieces for p in piece]
    assert head.index == 0
    assert head.id
    assert head.type == "function"
    assert head.function is not None
    assert head.function.name == "get_time"
    arguments = "".join(f.function.arguments or "" for f in fragments if f.function)
    assert all(f.index == 0 and f.id is None for f in fragments)
    _valid("get_time", json.loads(arguments))
    assert events[-1].choices[0].finish_reason == "tool_calls"


async def test_a_full_loop_call_then_tool_message_then_answer(served: Served) -> None:
    model = MODELS["hermes"][0]
    create = served.openai.chat.completions.create
    first = await create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", **SAMPLE)
    message = first.choices[0].message
    assert message.tool_calls
    call = message.tool_calls[0]
    history: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = await create(
        model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8, seed=1
    )
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason in ("stop", "length")
    assert isinstance(second.choices[0].message.content, str)


@pytest.mark.parametrize("family", ["hermes", "generic"])
async def test_auto_answers_content_or_a_call_never_a_leak_through_ollama(
    served: Served, family: str
) -> None:
    """Ollama has no ``tool_choice``: tools are ``auto``. Over a few seeds each answer
    is content without a call's opening, or calls that are valid."""
    model = MODELS[family][0]
    kinds = set()
    for seed in range(6):
        for stream in (False, True):
            options = {"seed": seed, "temperature": 1.0, "num_predict": 300}
            if stream:
                parts = [
                    p
                    async for p in await served.ollama.chat(
                        model=model, messages=ASK, tools=OLLAMA_TOOLS, options=options, stream=True
                    )
                ]
                content = "".join(p.message.content or "" for p in parts)
                calls = [c for p in parts for c in p.message.tool_calls or ()]
                assert parts[-1].done
                reason = parts[-1].done_reason
            else:
                answer = await served.ollama.chat(
                    model=model, messages=ASK, tools=OLLAMA_TOOLS, options=options
                )
                content, calls = answer.message.content or "", list(answer.message.tool_calls or ())
                reason = answer.done_reason
            if reason == "stop":  # (a call cut short by num_predict is text, as it came)
                assert "<tool_call>" not in content
                assert '"tool_calls"' not in content
            for call in calls:
                _valid(call.function.name, dict(call.function.arguments))
            kinds.add("calls" if calls else "content")
    assert "calls" in kinds or family == "hermes", kinds  # generic: JSON either way


async def test_ollama_loop_with_a_tool_turn(served: Served) -> None:
    model = MODELS["hermes"][0]
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}}
            ],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
    ]
    answer = await served.ollama.chat(
        model=model, messages=history, tools=TOOLS, options={"num_predict": 8, "seed": 1}
    )
    assert answer.done
    assert answer.done_reason in ("stop", "length")


BAD_SCHEMA = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}},
    },
}
NAMED_NOPE = {"type": "function", "function": {"name": "nope"}}
ARRAY_SCHEMA = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}


def _many(tool: dict[str, Any], count: int) -> list[dict[str, Any]]:
    return [{**tool, "function": {**tool["function"], "name": f"f{i}"}} for i in range(count)]


BAD_OPENAI: list[tuple[dict[str, Any], str]] = [
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": TOOLS, "tool_choice": NAMED_NOPE}, "tool_choice"),
    ({"tools": [BAD_SCHEMA]}, "tools[0].function.parameters"),
    ({"tools": [ARRAY_SCHEMA]}, "tools"),
    ({"tools": _many(WEATHER, 129)}, "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "?"}]},
        "messages",
    ),
]  # fmt: skip


def _nothing_loaded(served: Served) -> None:
    assert not served.manager.statistics().instances


@pytest.mark.parametrize(("extra", "param"), BAD_OPENAI)
async def test_bad_tool_input_is_a_400_naming_it_on_openai(
    served: Served, extra: dict[str, Any], param: str
) -> None:
    body = {"model": MODELS["hermes"][0], "messages": ASK, **extra}
    answer = await served.http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"].startswith(param), answer.text
    _nothing_loaded(served)


BAD_OLLAMA: list[tuple[dict[str, Any], str]] = [  # (Ollama's errors are a message only)
    ({"tools": [WEATHER, WEATHER]}, "duplicate function name"),
    ({"tools": [BAD_SCHEMA]}, "schema cannot be enforced"),
    ({"tools": _many(TIME, 129)}, "128"),
    ({"tools": TOOLS, "format": "json"}, "cannot be combined with tools"),
    ({"messages": [*ASK, {"role": "tool", "tool_name": "get_time", "content": "?"}]}, "answers no"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "said"), BAD_OLLAMA)
async def test_bad_tool_input_is_a_400_saying_so_on_ollama(
    served: Served, extra: dict[str, Any], said: str
) -> None:
    body = {"model": MODELS["hermes"][0], "messages": ASK, "stream": False, **extra}
    answer = await served.http.post("/api/chat", json=body)
    assert answer.status_code == 400, answer.text
    assert said in answer.json()["error"], answer.text
    _nothing_loaded(served)


async def test_show_says_the_tool_format(served: Served) -> None:
    for family, (file, _) in MODELS.items():
        shown = await served.ollama.show(file)
        assert "tools" in (shown.capabilities or [])
        answer = await served.http.post("/api/show", json={"model": file})
        assert answer.json()["tool_format"] == family


async def test_show_reads_the_format_from_a_configured_jinja_file(
    tool_models: Path, tmp_path: Path
) -> None:
    """A model whose own template is generic, configured with a Hermes Jinja file: the
    file is what a chat renders with, so /api/show shows its text and its format; a
    file that cannot be read shows as no template (a chat answers that error)."""
    file = MODELS["generic"][0]
    (tmp_path / "hermes.jinja").write_text(HERMES)
    config = tmp_path / "modeld.toml"
    config.write_text(f'[models."{file}"]\nchat_template = "hermes.jinja"\n')
    async for served in _serve(tool_models, config=str(config)):
        shown = (await served.http.post("/api/show", json={"model": file})).json()
        assert (shown["tool_format"], shown["template"]) == ("hermes", HERMES)
        (tmp_path / "hermes.jinja").unlink()
        shown = (await served.http.post("/api/show", json={"model": file})).json()
        assert shown["tool_format"] == "generic"


# --- the real Gemma 3 270M: its template has no tool support, so the generic format ---


@pytest.fixture(scope="module")
def gemma_models(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Path:
    directory = tmp_path_factory.mktemp("gemma-tools")
    link_or_copy(gemma_path, directory / "gemma.gguf")
    (directory.parent / "gemma3.jinja").write_text(GEMMA3)
    return directory


async def test_gemma_with_the_generic_format_calls_as_required(gemma_models: Path) -> None:
    """One manager, one load: a forced call (streamed, through the openai client) and a
    named one (through the ollama-shaped history loop's first step, not streamed)."""
    template = gemma_models.parent / "gemma3.jinja"
    config = gemma_models.parent / "modeld.toml"
    config.write_text(f'[models."gemma.gguf"]\nchat_template = "{template}"\n')
    async for served in _serve(gemma_models, n_ctx="2048", config=str(config)):
        shown = (await served.http.post("/api/show", json={"model": "gemma.gguf"})).json()
        assert shown["tool_format"] == "generic"
        ask = [{"role": "user", "content": "What time is it in Berlin?"}]
        create = served.openai.chat.completions.create
        events = [
            e
            async for e in await create(
                model="gemma.gguf", messages=ask, tools=TOOLS, tool_choice="required",
                stream=True, max_tokens=120, temperature=0, parallel_tool_calls=False,
            )
        ]  # fmt: skip
        pieces = [p for e in events for c in e.choices for p in c.delta.tool_calls or ()]
        assert pieces, events
        name = pieces[0].function.name if pieces[0].function else None
        arguments = "".join(p.function.arguments or "" for p in pieces[1:] if p.function)
        _valid(str(name), json.loads(arguments))
        assert events[-1].choices[0].finish_reason == "tool_calls"
        named = await create(
            model="gemma.gguf", messages=ask, tools=TOOLS, max_tokens=120, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )  # fmt: skip
        calls = named.choices[0].message.tool_calls
        assert calls is not None
        assert [c.function.name for c in calls] == ["get_weather"]
        _valid("get_weather", json.loads(calls[0].function.arguments))


async def test_the_library_returns_the_calls(tool_models: Path) -> None:
    """``ModelManager.chat`` with tools: the calls in ``result.tool_calls``, the text
    content only; streamed, the chunks carry the calls' pieces."""
    settings = load_settings(
        {"models_dir": str(tool_models), "threads": "1", "n_ctx": "4096"}, env={}
    )
    request = ChatRequest(
        messages=ASK, model=MODELS["mistral"][0], tools=TOOLS, tool_choice="required", **SAMPLE
    )
    async with ModelManager(settings) as manager:
        text, result = await manager.chat(request)
        async with manager.stream_chat(request) as generation:
            pieces = [p async for chunk in generation for p in chunk.tool_calls]
    assert text == ""
    assert result.done_reason == "stop"
    assert len(result.tool_calls) >= 1
    for call in result.tool_calls:
        assert call.id.startswith("call_")
        _valid(call.function.name, json.loads(call.function.arguments))
    assert pieces[0].name == result.tool_calls[0].function.name  # same seed, same call
