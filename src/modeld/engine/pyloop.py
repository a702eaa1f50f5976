"""The pure-Python token loop: the typed reference for the C loop, and the fallback.

It drives ``Llama.generate()``, so its sampling is llama-cpp-python's own chain; the C loop
builds the same chain and is tested token for token against this one.
"""

from __future__ import annotations

import ctypes
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llama_cpp

from modeld.engine.base import RING_CAPACITY_BYTES, LoopOutcome, StopCode, TokenRing
from modeld.engine.pyring import PyTokenRing
from modeld.engine.textstream import TextAssembler
from modeld.types import LoopKind, SamplingParams

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["PythonTokenLoop"]

_PIECE_BUFFER_BYTES = 256


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
    ) -> LoopOutcome:
        vocab = llama._model.vocab
        piece_buffer = (ctypes.c_char * _PIECE_BUFFER_BYTES)()
        text = TextAssembler(params.stop)
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        llama.set_seed(seed)
        llama.reset()  # type: ignore[no-untyped-call]

        # Prompt evaluation runs inside one llama_decode per batch; the abort callback is
        # the only way to stop it early. It costs a Python call per graph node, so it is
        # installed for the prompt only.
        abort = llama_cpp.ggml_abort_callback(lambda _data: ring.cancelled)
        llama_cpp.llama_set_abort_callback(llama.ctx, abort, None)
        started_ns = time.perf_counter_ns()
        first_token_ns = 0
        completion_tokens = 0
        stop_code = StopCode.LENGTH
        error: str | None = None
        generator = llama.generate(
            prompt_tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            reset=True,
        )
        try:
            for token in generator:
                if first_token_ns == 0:
                    first_token_ns = time.perf_counter_ns()
                    llama_cpp.llama_set_abort_callback(
                        llama.ctx, llama_cpp.ggml_abort_callback(), None
                    )
                if ring.cancelled:
                    stop_code = StopCode.CANCELLED
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    stop_code = StopCode.STOP
                    break
                completion_tokens += 1
                n = llama_cpp.llama_token_to_piece(
                    vocab, token, piece_buffer, _PIECE_BUFFER_BYTES, 0, False
                )
                out = text.feed(piece_buffer.raw[: max(n, 0)])
                if not ring.push(out, 1):
                    stop_code = StopCode.CANCELLED
                    break
                if text.stopped:
                    stop_code = StopCode.STOP
                    break
                if completion_tokens >= params.max_tokens:
                    break
                if llama.n_tokens >= llama.n_ctx():
                    break  # context full: LENGTH, as llama-server reports it
        except RuntimeError as exc:
            if ring.cancelled:
                stop_code = StopCode.CANCELLED
            else:
                stop_code, error = StopCode.ERROR, str(exc)
        finally:
            generator.close()
            llama_cpp.llama_set_abort_callback(llama.ctx, llama_cpp.ggml_abort_callback(), None)
        if stop_code in (StopCode.LENGTH, StopCode.STOP):
            tail = text.flush()  # empty after a stop string
            if tail:
                ring.push(tail, 0)
        ended_ns = time.perf_counter_ns()
        prompt_end_ns = first_token_ns or ended_ns
        return LoopOutcome(
            stop_code=stop_code,
            prompt_tokens=len(prompt_tokens),
            completion_tokens=completion_tokens,
            prompt_eval_ms=(prompt_end_ns - started_ns) / 1e6,
            eval_ms=(ended_ns - prompt_end_ns) / 1e6,
            error=error,
        )
