"""The pure-Python token loop: the typed reference for the C loop, and the fallback.

Free decoding drives ``Llama.generate()``, so its sampling is llama-cpp-python's own chain;
under a grammar it samples with :class:`~modeld.engine.fastgrammar.FastGrammarSampler`
(the grammar checked against the chosen token first), whose output is that chain's. The C
loop does the same and is tested token for token against this one.
"""

from __future__ import annotations

import ctypes
import secrets
import time
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import llama_cpp

from modeld.engine.base import RING_CAPACITY_BYTES, LoopOutcome, StopCode, TokenRing
from modeld.engine.fastgrammar import FastGrammarSampler, grammar_sampler
from modeld.engine.grammar import GRAMMAR_REFUSED
from modeld.engine.kv_prefix import keep_prefix
from modeld.engine.logprobs import logprob_entry
from modeld.engine.pyring import PyTokenRing
from modeld.engine.textstream import TextAssembler
from modeld.types import GrammarConstraint, LoopKind, SamplingParams, as_constraint

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["PythonTokenLoop"]


class PythonTokenLoop:
    kind = LoopKind.PYTHON

    def new_ring(self, capacity_bytes: int = RING_CAPACITY_BYTES) -> TokenRing:
        return PyTokenRing(capacity_bytes)

    def run(
        self,
        llama: Llama,
        ring: TokenRing,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        grammar: str | GrammarConstraint | None = None,
        *,
        cached: int = 0,
    ) -> LoopOutcome:
        if not 0 <= cached < len(prompt_tokens):
            raise ValueError("cached must leave at least one prompt token to evaluate")
        vocab = llama._model.vocab
        if params.max_tokens is None:
            raise ValueError("max_tokens must be set (the engine settles None)")
        max_tokens = params.max_tokens
        piece = _PieceReader(vocab)
        text = TextAssembler(params.stop)
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        llama.set_seed(seed)

        ring.loop_started()  # a consumer that asked is woken (the C loop: without the GIL)
        started_ns = time.perf_counter_ns()
        kept = keep_prefix(llama, cached)
        if kept:  # Llama.eval() goes on from the kept positions
            llama.n_tokens = kept
            llama.input_ids[:kept] = prompt_tokens[:kept]
        else:
            llama.reset()  # type: ignore[no-untyped-call]
        to_evaluate = prompt_tokens[kept:]
        kv_known = True
        # A grammar llama.cpp refuses must never reach a chain (the C loop checks the same
        # way); the sampler made here is the one that runs.
        constraint = as_constraint(grammar)
        sampler: FastGrammarSampler | None = None
        if constraint is not None:
            made = grammar_sampler(vocab, constraint)
            if not made:
                return self._outcome(
                    StopCode.ERROR, len(prompt_tokens), 0, started_ns, 0, kept, _kv(llama),
                    GRAMMAR_REFUSED,
                )  # fmt: skip
            sampler = FastGrammarSampler(llama, params, made, seed, full_pass=constraint.full_pass)
        first_token_ns = 0
        completion_tokens = 0
        stop_code = StopCode.LENGTH
        error: str | None = None
        # The prompt is evaluated here in the same n_batch chunks Llama.generate() would use
        # (so the results are bit-identical), with a cancel check between chunks. The C loop
        # can also stop inside a chunk through llama.cpp's abort callback; from Python that
        # callback would cost a GIL round trip per graph node, which made long prompts
        # several times slower, so the twin stops at chunk boundaries.
        chunks = [
            to_evaluate[i : i + llama.n_batch] for i in range(0, len(to_evaluate), llama.n_batch)
        ]
        try:
            for chunk in chunks[:-1]:
                if ring.cancelled:
                    raise _Cancelled
                llama.eval(chunk)
            if ring.cancelled:
                raise _Cancelled
        except _Cancelled:
            if sampler is not None:
                sampler.close()
            return self._outcome(
                StopCode.CANCELLED, len(prompt_tokens), 0, started_ns, 0, kept, _kv(llama)
            )
        except RuntimeError as exc:
            if sampler is not None:
                sampler.close()
            return self._outcome(
                StopCode.ERROR, len(prompt_tokens), 0, started_ns, 0, kept, None, str(exc)
            )
        last_chunk = chunks[-1] if chunks else []
        generator = (
            _generate_free(llama, last_chunk, params)
            if sampler is None
            else _generate_constrained(llama, last_chunk, sampler)
        )
        try:
            for token in generator:
                if first_token_ns == 0:
                    first_token_ns = time.perf_counter_ns()
                if ring.cancelled:
                    stop_code = StopCode.CANCELLED
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    stop_code = StopCode.STOP
                    break
                completion_tokens += 1
                data = piece(token)
                if params.logprobs is not None:  # before the text, as the C loop does
                    ring.push_logprob(logprob_entry(llama, token, data, params.logprobs, piece))
                out = text.feed(data)
                if not ring.push(out, 1):
                    stop_code = StopCode.CANCELLED
                    break
                if text.stopped:
                    stop_code = StopCode.STOP
                    break
                if completion_tokens >= max_tokens:
                    break
                if llama.n_tokens >= llama.n_ctx():
                    break  # context full: LENGTH, as llama-server reports it
        except RuntimeError as exc:
            kv_known = False  # the failed decode may have left part of its batch
            if ring.cancelled:
                stop_code = StopCode.CANCELLED
            else:
                stop_code, error = StopCode.ERROR, str(exc)
        finally:
            generator.close()
            if sampler is not None:
                sampler.close()  # also when the generator never started
        if stop_code in (StopCode.LENGTH, StopCode.STOP):
            tail = text.flush()  # empty after a stop string
            if tail:
                ring.push(tail, 0)
        return self._outcome(
            stop_code,
            len(prompt_tokens),
            completion_tokens,
            started_ns,
            first_token_ns,
            kept,
            _kv(llama) if kv_known else None,
            error,
        )

    @staticmethod
    def _outcome(
        stop_code: StopCode,
        prompt_tokens: int,
        completion_tokens: int,
        started_ns: int,
        first_token_ns: int,
        cached_tokens: int,
        kv_tokens: list[int] | None,
        error: str | None = None,
    ) -> LoopOutcome:
        ended_ns = time.perf_counter_ns()
        prompt_end_ns = first_token_ns or ended_ns
        return LoopOutcome(
            stop_code=stop_code,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            prompt_eval_ms=(prompt_end_ns - started_ns) / 1e6,
            eval_ms=(ended_ns - prompt_end_ns) / 1e6,
            error=error,
            cached_tokens=cached_tokens,
            kv_tokens=kv_tokens,
        )


def _generate_free(
    llama: Llama, chunk: Sequence[int], params: SamplingParams
) -> Generator[int, Any, None]:
    """Llama.generate() with llama-cpp-python's chain, after the chunks evaluated before."""
    return llama.generate(
        chunk,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        temp=params.temperature,
        repeat_penalty=params.repeat_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        reset=False,  # continue after the chunks evaluated before
    )


def _generate_constrained(
    llama: Llama, chunk: Sequence[int], sampler: FastGrammarSampler
) -> Generator[int, Any, None]:
    """What Llama.generate() does (evaluate, sample the last position, repeat), sampling
    with ``sampler``, which it closes when the generator is closed."""
    tokens = list(chunk)
    try:
        while True:
            llama.eval(tokens)
            token = sampler.sample()
            yield token
            tokens = [token]
    finally:
        sampler.close()


def _kv(llama: Llama) -> list[int]:
    """What the KV cache holds: Llama.eval() records every token it decodes."""
    return [int(token) for token in llama.input_ids[: llama.n_tokens]]


class _Cancelled(Exception):
    """The ring was cancelled between prompt chunks."""


class _PieceReader:
    """``llama_token_to_piece`` into a buffer that grows when a piece does not fit."""

    def __init__(self, vocab: object, size_bytes: int = 256) -> None:
        self._vocab = vocab
        self._buffer = (ctypes.c_char * size_bytes)()
        self._size_bytes = size_bytes

    def __call__(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(
            self._vocab, token, self._buffer, self._size_bytes, 0, False
        )
        if n < 0:  # -n is the size needed
            self._size_bytes = -n
            self._buffer = (ctypes.c_char * self._size_bytes)()
            n = llama_cpp.llama_token_to_piece(
                self._vocab, token, self._buffer, self._size_bytes, 0, False
            )
        return self._buffer.raw[: max(n, 0)]
