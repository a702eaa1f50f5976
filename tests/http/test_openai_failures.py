"""Failures through the real ``openai`` client, counted the way the client sees them:
permanent ones (404, 507 ``model_too_large``, 500 ``model_load_failed``) are tried once
(``x-should-retry: false`` where the client would otherwise retry a 5xx); those that say
"not now" keep their ``Retry-After`` (see test_openai_gemma.py for 429 and 503)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.support.gguf_bytes import base_spec, build_gguf
from tests.support.http import ServerFactory
from tests.support.openai_clients import answered, openai_client, write_chat_models

HELLO = [{"role": "user", "content": "hello"}]


def test_an_unknown_model_is_a_404_tried_once(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    client = openai_client(server)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such.gguf", messages=HELLO)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert answered(server, "/v1/chat/completions", 404) == 1
    with pytest.raises(openai.BadRequestError) as unsafe:
        client.completions.create(model="../etc/passwd", prompt="hi")
    assert unsafe.value.code == "invalid_model_id"
    assert unsafe.value.param == "model"


@pytest.mark.parametrize("name", ["gpt-4o", "codellama70b", "llama3:8b", "x.gguf "])
def test_a_name_no_file_has_is_a_404_on_every_route(
    start_server: ServerFactory, models_dir: Path, name: str
) -> None:
    """A well-formed name that is not configured (an alias has no ``.gguf``) is a model
    that does not exist here, as OpenAI says it: 404 ``model_not_found``, ``param:
    model``, not a 400 about file names."""
    client = openai_client(start_server(models_dir))
    calls = [
        lambda: client.chat.completions.create(model=name, messages=HELLO),
        lambda: client.completions.create(model=name, prompt="hi"),
        lambda: client.embeddings.create(model=name, input="hi"),
        lambda: client.responses.create(model=name, input="hi"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.code == "model_not_found"
        assert caught.value.param == "model"
        assert name.strip() in caught.value.message


def test_a_model_too_large_is_a_507_tried_once(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(
        write_chat_models(models_dir), "--vram-budget-mb", "1", "--vram-margin-mb", "0"
    )
    client = openai_client(server)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="tiny-chat.gguf", messages=HELLO)
    assert caught.value.status_code == 507
    assert caught.value.code == "model_too_large"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert answered(server, "/v1/chat/completions", 507) == 1  # not three
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="tiny-a.gguf", input="hello")
    assert answered(server, "/v1/embeddings", 507) == 1


def test_a_model_llama_cpp_refuses_is_a_500_tried_once(
    start_server: ServerFactory, models_dir: Path
) -> None:
    (models_dir / "refused.gguf").write_bytes(build_gguf(base_spec()))  # no real weights
    server = start_server(models_dir)
    client = openai_client(server)
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="refused.gguf", prompt="hi")
    assert caught.value.code == "model_load_failed"
    assert answered(server, "/v1/completions", 500) == 1
    # Right after it, the cooldown: a 503 the client may retry, with Retry-After.
    with pytest.raises(openai.InternalServerError) as cooling:
        openai_client(server, max_retries=0).completions.create(model="refused.gguf", prompt="hi")
    assert cooling.value.status_code == 503
    assert cooling.value.code == "model_cooling_down"
    assert int(cooling.value.response.headers["retry-after"]) >= 1
    assert "x-should-retry" not in cooling.value.response.headers
