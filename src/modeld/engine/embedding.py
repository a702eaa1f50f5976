"""Embeddings from a second llama.cpp context on a model's already-loaded weights.

No second copy of the weights (a second ``Llama(embedding=True)`` would load them
again): ``llama_init_from_model`` on the same ``llama_model`` with ``embeddings`` on and
a pooling type. Decoder LLMs declare no pooling (Gemma 3's is NONE: one vector per
token), so those are mean-pooled; models that declare MEAN, CLS or LAST keep theirs.
Vectors are L2-normalised, as OpenAI, Ollama and llama-server return them.

Used only on the model's worker thread, like the generation context.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence

import llama_cpp

from modeld.errors import ClientDisconnected, EngineError, ResourcesExhausted
from modeld.types import ContextSizes

__all__ = ["EmbeddingContext", "LazyEmbedding", "pooling_for"]

_POOLED = frozenset(
    {llama_cpp.LLAMA_POOLING_TYPE_MEAN, llama_cpp.LLAMA_POOLING_TYPE_CLS,
     llama_cpp.LLAMA_POOLING_TYPE_LAST}
)  # fmt: skip


def pooling_for(model_pooling: int) -> int:
    """The model's own pooling where it has one that makes one vector, else MEAN."""
    return model_pooling if model_pooling in _POOLED else llama_cpp.LLAMA_POOLING_TYPE_MEAN


class EmbeddingContext:
    """Owns one embedding context and its batch; :meth:`close` frees both (before the
    model they point into is freed).

    Raises :class:`ResourcesExhausted` from the constructor when llama.cpp cannot make
    the context (out of memory).
    """

    def __init__(self, model: object, sizes: ContextSizes, n_threads: int, pooling: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sizes.n_ctx
        params.n_batch = sizes.n_batch
        params.n_ubatch = sizes.n_ubatch  # a whole input in one micro-batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = n_threads
        params.embeddings = True
        params.pooling_type = pooling
        self.n_tokens = sizes.n_ubatch
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(model))
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise ResourcesExhausted("llama.cpp could not create an embedding context")
        self._batch = llama_cpp.llama_batch_init(self.n_tokens, 0, 1)

    def use_threads(self, n_threads: int) -> None:
        """Run the next decodes on ``n_threads`` (the thread budget's lease)."""
        llama_cpp.llama_set_n_threads(self._ctx, n_threads, n_threads)

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """The L2-normalised embedding of one input of 1 to ``n_tokens`` tokens.

        Raises ValueError outside those bounds (llama.cpp would abort the process),
        :class:`EngineError` when the decode fails.
        """
        if not 1 <= len(tokens) <= self.n_tokens:
            raise ValueError(f"an input holds 1 to {self.n_tokens} tokens, not {len(tokens)}")
        batch = self._batch
        for index, token in enumerate(tokens):
            batch.token[index] = token
            batch.pos[index] = index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = True
        batch.n_tokens = len(tokens)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode returned {status} for an embedding")
        pooled = llama_cpp.llama_get_embeddings_seq(self._ctx, 0)
        if not pooled:
            raise EngineError("llama.cpp returned no pooled embedding")
        vector = ctypes.cast(pooled, ctypes.POINTER(ctypes.c_float * self.n_embd)).contents[:]
        norm = math.sqrt(math.fsum(x * x for x in vector))
        return [x / norm for x in vector] if norm > 0 else vector

    def close(self) -> None:
        """Free the batch and the context. Idempotent."""
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


class LazyEmbedding:
    """An :class:`EmbeddingContext` made on first use (its memory is charged then) and
    kept until :meth:`close`."""

    def __init__(self, model: object, sizes: ContextSizes, n_threads: int, pooling: int) -> None:
        self._args = (model, sizes, n_threads, pooling)
        self._context: EmbeddingContext | None = None

    def use_threads(self, n_threads: int) -> None:
        """Run the next decodes on ``n_threads``, in the context made later too."""
        model, sizes, _, pooling = self._args
        self._args = (model, sizes, n_threads, pooling)
        if self._context is not None:
            self._context.use_threads(n_threads)

    @property
    def made(self) -> bool:
        """Whether the context exists (its memory is held)."""
        return self._context is not None

    def embed_all(
        self, inputs: Sequence[Sequence[int]], cancelled: Callable[[], bool]
    ) -> list[list[float]]:
        """Each input's embedding; ``cancelled`` is asked between inputs (then
        :class:`ClientDisconnected`)."""
        if self._context is None:
            self._context = EmbeddingContext(*self._args)
        vectors: list[list[float]] = []
        for tokens in inputs:
            if cancelled():
                raise ClientDisconnected("the embedding request was cancelled")
            vectors.append(self._context.embed(tokens))
        return vectors

    def close(self) -> None:
        """Free the context (before the weights it points into). Idempotent."""
        if self._context is not None:
            self._context.close()
