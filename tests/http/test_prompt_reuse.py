"""Prompt-prefix reuse as a client sees it: ``cached_tokens`` in the terminal metrics,
``modeld_prompt_tokens_cached_total`` in /metrics, nothing kept across an eviction, and
``--no-prompt-reuse``."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.http.test_observability import metric, scrape
from tests.support.http import ServerFactory, ndjson

PROMPT = "hello world and the world"
TINY_A = {"model": "tiny-a.gguf"}


def _metrics(client: httpx.Client, prompt: str, stream: bool) -> dict[str, int]:
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": stream, **TINY_A}
    response = client.post("/infer", json=body)
    assert response.status_code == 200
    result = ndjson(response.text)[-1] if stream else response.json()
    assert result["done_reason"] == "length"
    return result["metrics"]  # type: ignore[no-any-return]


def test_a_repeated_prompt_is_reported_as_cached(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        first = _metrics(client, PROMPT, stream=False)
        assert first["cached_tokens"] == 0
        again = _metrics(client, PROMPT, stream=True)
        # all but the last prompt token, whose logits the first sample needs
        assert again["cached_tokens"] == again["prompt_tokens"] - 1
        grown = _metrics(client, PROMPT + " and the hello", stream=True)
        assert grown["cached_tokens"] >= first["prompt_tokens"]
        counted = again["cached_tokens"] + grown["cached_tokens"]
        assert metric(scrape(client), "modeld_prompt_tokens_cached_total", **TINY_A) == counted

        # an evicted instance takes its cache with it: the reload starts empty
        assert client.delete("/models/tiny-a.gguf/instance").status_code == 200
        assert _metrics(client, PROMPT, stream=False)["cached_tokens"] == 0
        assert metric(scrape(client), "modeld_prompt_tokens_cached_total", **TINY_A) == counted


def test_no_prompt_reuse_evaluates_every_prompt_whole(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--no-prompt-reuse")
    with server.client() as client:
        for stream in (False, True, True):
            assert _metrics(client, PROMPT, stream=stream)["cached_tokens"] == 0
        assert metric(scrape(client), "modeld_prompt_tokens_cached_total", **TINY_A) == 0
