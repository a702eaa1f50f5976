"""Every protocol reads every sampling parameter it takes, by its own name, into the
typed request; the ones it does not take are listed as such.

``SAMPLES`` holds a valid, non-default value for each field of ``SamplingParams``: a
field added there fails :func:`test_every_sampling_parameter_has_a_sample` until it has
one, and then every protocol is checked to carry it (or to list it as unsupported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from modeld.api.ollama.wire import OLLAMA_SAMPLING
from modeld.api.openai.responses import RESPONSES_SAMPLING
from modeld.api.openai.translate import OPENAI_SAMPLING
from modeld.api.routes import INFER
from modeld.api.sampling import SAMPLING_FIELDS, SamplingNames
from modeld.types import SamplingParams
from tests.api.conftest import TINY_CHAT, AppFactory

pytestmark = pytest.mark.anyio

SAMPLES: dict[str, tuple[Any, Any]] = {  # field: (value sent, value in the request)
    "max_tokens": (5, 5),
    "temperature": (0.5, 0.5),
    "top_p": (0.5, 0.5),
    "top_k": (7, 7),
    "min_p": (0.25, 0.25),
    "repeat_penalty": (1.25, 1.25),
    "stop": (["zz"], ("zz",)),
    "seed": (1234, 1234),
    "presence_penalty": (0.5, 0.5),
    "frequency_penalty": (-0.5, -0.5),
    "logprobs": (3, 3),  # /infer's count; every other protocol's switch + count is its own
}


@dataclass(frozen=True)
class Carrier:
    path: str
    names: SamplingNames
    body: Callable[[dict[str, Any]], dict[str, Any]]  # the wire's sampling fields → a body


def _top_level(base: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda fields: {**base, **fields}


CARRIERS = [
    Carrier("/infer", INFER.sampling, _top_level({"model": TINY_CHAT, "prompt": "hi"})),
    Carrier(
        "/v1/chat/completions",
        OPENAI_SAMPLING,
        _top_level({"model": TINY_CHAT, "messages": [{"role": "user", "content": "hi"}]}),
    ),
    Carrier("/v1/completions", OPENAI_SAMPLING, _top_level({"model": TINY_CHAT, "prompt": "hi"})),
    Carrier("/v1/responses", RESPONSES_SAMPLING, _top_level({"model": TINY_CHAT, "input": "hi"})),
    Carrier(
        "/api/generate",
        OLLAMA_SAMPLING,
        lambda fields: {"model": "tiny-chat", "prompt": "hi", "options": fields},
    ),
    Carrier(
        "/api/chat",
        OLLAMA_SAMPLING,
        lambda fields: {
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": "hi"}],
            "options": fields,
        },
    ),
]


def test_every_sampling_parameter_has_a_sample() -> None:
    assert set(SAMPLES) == set(SAMPLING_FIELDS)
    defaults = SamplingParams()
    for name, (_, expected) in SAMPLES.items():
        assert getattr(defaults, name) != expected, name  # a default would prove nothing


@pytest.mark.parametrize("carrier", CARRIERS, ids=lambda c: c.path)
def test_every_field_is_taken_or_listed_unsupported(carrier: Carrier) -> None:
    for name in SAMPLING_FIELDS:
        assert (name in carrier.names.taken) != (name in carrier.names.unsupported), name


def test_an_unknown_field_cannot_be_listed() -> None:
    with pytest.raises(ValueError, match="no sampling parameters"):
        SamplingNames("broken", unsupported=frozenset({"temprature"}))


@pytest.mark.parametrize("carrier", CARRIERS, ids=lambda c: c.path)
async def test_each_taken_parameter_reaches_the_request(
    app_factory: AppFactory, carrier: Carrier
) -> None:
    names = carrier.names
    async with app_factory() as app:
        for name in names.taken:
            sent, expected = SAMPLES[name]
            body = carrier.body({names.wire(name): sent, **_short(names, name)})
            response = await app.http.post(carrier.path, json={**body, "stream": False})
            assert response.status_code == 200, (name, response.text)
            assert getattr(app.manager.requests[-1], name) == expected, name


@pytest.mark.parametrize("carrier", CARRIERS, ids=lambda c: c.path)
async def test_a_wrong_type_is_a_400_naming_the_wire_field(
    app_factory: AppFactory, carrier: Carrier
) -> None:
    names = carrier.names
    async with app_factory() as app:
        for name in names.taken:
            body = carrier.body({names.wire(name): {"not": "a value"}})
            response = await app.http.post(carrier.path, json={**body, "stream": False})
            assert response.status_code == 400, (name, response.text)
            assert names.wire(name) in response.text, (name, response.text)
        assert not app.manager.requests  # nothing reached the manager


def _short(names: SamplingNames, name: str) -> dict[str, Any]:
    """A small ``max_tokens`` unless it is the field under test (the test stays quick)."""
    return {} if name == "max_tokens" else {names.wire("max_tokens"): 2}


def test_the_derived_struct_reads_wire_names() -> None:
    decoded = OLLAMA_SAMPLING.decode(msgspec.json.encode({"num_predict": 3, "stop": "x"}))
    assert OLLAMA_SAMPLING.fields(decoded) == {"max_tokens": 3, "stop": ["x"]}
