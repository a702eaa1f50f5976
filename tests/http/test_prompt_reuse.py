"""Prompt-prefix reuse as a client sees it: ``cached_tokens`` in the terminal metrics,
``modeld_prompt_tokens_cached_total`` in /metrics, the prompt cache across an eviction,
``--prompt-cache-mb 0`` and ``--no-prompt-reuse``."""

from __future__ import annotations

import time
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

        # an evicted instance saved its context in the prompt cache: the reload restores
        # it, so all but the prompt's last token count as cached again
        assert client.delete("/models/tiny-a.gguf/instance").status_code == 200
        restored = _metrics(client, PROMPT, stream=False)
        assert restored["cached_tokens"] == restored["prompt_tokens"] - 1
        counted += restored["cached_tokens"]
        assert metric(scrape(client), "modeld_prompt_tokens_cached_total", **TINY_A) == counted


def test_no_prompt_reuse_evaluates_every_prompt_whole(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--no-prompt-reuse")
    with server.client() as client:
        for stream in (False, True, True):
            assert _metrics(client, PROMPT, stream=stream)["cached_tokens"] == 0
        assert metric(scrape(client), "modeld_prompt_tokens_cached_total", **TINY_A) == 0


def test_an_evicted_conversation_comes_back_from_the_prompt_cache(
    start_server: ServerFactory, models_dir: Path
) -> None:
    """A prompt long enough to keep (>= 32 tokens) is saved when its instance unloads;
    the reloaded instance restores it, and ``cached_tokens`` counts the restored tokens."""
    long = " ".join([PROMPT] * 2)
    server = start_server(models_dir)
    with server.client() as client:
        first = _metrics(client, long, stream=False)
        assert client.delete("/models/tiny-a.gguf/instance").status_code == 200
        before = client.get("/status").json()["prompt_cache"]
        assert before["enabled"]
        assert before["memory_entries"] >= 1
        grown = _metrics(client, long + " and the hello", stream=True)
        assert grown["cached_tokens"] >= first["prompt_tokens"]
        status = client.get("/status").json()["prompt_cache"]
        assert status["hits_memory"] == before["hits_memory"] + 1
        assert status["restored_tokens"] - before["restored_tokens"] == grown["cached_tokens"]
        text = scrape(client)
        assert metric(text, "modeld_prompt_cache_hits_total", tier="memory") >= 1
        assert metric(text, "modeld_prompt_cache_bytes", tier="memory") > 0


def test_prompt_cache_mb_0_turns_the_cache_off(
    start_server: ServerFactory, models_dir: Path
) -> None:
    long = " ".join([PROMPT] * 2)
    server = start_server(models_dir, "--prompt-cache-mb", "0")
    with server.client() as client:
        _metrics(client, long, stream=False)
        assert client.delete("/models/tiny-a.gguf/instance").status_code == 200
        assert _metrics(client, long + " and the hello", stream=False)["cached_tokens"] == 0
        assert client.get("/status").json()["prompt_cache"]["enabled"] is False


def _cache_status_when(client: httpx.Client, saves: int) -> dict[str, int]:
    """/status's prompt cache once it counts ``saves`` (the idle keep runs on the model's
    worker after the answer is sent)."""
    deadline_s = time.monotonic() + 30
    while True:
        status: dict[str, int] = client.get("/status").json()["prompt_cache"]
        if status["saves"] >= saves or time.monotonic() > deadline_s:
            return status
        time.sleep(0.02)


def test_an_idle_model_keeps_its_prefix_so_the_next_conversation_pays_no_save(
    start_server: ServerFactory, models_dir: Path
) -> None:
    """Two conversations alternate: each one's prefix is kept while the model idles
    after its turn, not copied again when the other's turn displaces it, and restored
    on its next turn."""
    first_a, first_b = " ".join([PROMPT] * 2), " ".join(["the hello world"] * 4)
    server = start_server(models_dir)
    with server.client() as client:
        a = _metrics(client, first_a, stream=True)
        status = _cache_status_when(client, saves=1)
        assert (status["saves"], status["memory_entries"]) == (1, 1)  # nothing displaced it
        _metrics(client, first_b, stream=False)  # displaces A: A is not saved again
        status = _cache_status_when(client, saves=2)
        assert (status["saves"], status["memory_entries"]) == (2, 2)
        resumed = _metrics(client, first_a + " and the hello", stream=True)
        assert resumed["cached_tokens"] >= a["prompt_tokens"]
        status = _cache_status_when(client, saves=3)
        assert (status["hits_memory"], status["saves"]) == (1, 3)
