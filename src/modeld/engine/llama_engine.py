"""The adapter to llama-cpp-python: one model + context, used only from its owner thread.

llama.cpp failures are translated here, once, into modeld errors (``raise ... from``).
It implements :class:`~modeld.engine.contract.Engine`.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp
import msgspec

from modeld.engine.base import (
    RING_CAPACITY_BYTES,
    EngineClosed,
    LoopOutcome,
    NotOwnerThread,
    StopCode,
    TokenLoop,
    TokenRing,
)
from modeld.engine.cache_tier import CacheTier
from modeld.engine.chat_format import ChatFormatter
from modeld.engine.context_threads import ContextThreads
from modeld.engine.contract import PreparedRequest, Recipe, Request
from modeld.engine.embedding import LazyEmbedding, pooling_for
from modeld.engine.fitting import PromptTokens
from modeld.engine.grammar import check_grammar
from modeld.engine.kv_prefix import reusable_prefix
from modeld.engine.llama_load import load_llama, malloc_trim
from modeld.engine.preparation import prepare_from_parts
from modeld.engine.tokens import Tokenizer
from modeld.errors import ModelLoadFailed, ResourcesExhausted
from modeld.types import (
    ChatMessage,
    EmbeddingInput,
    GrammarConstraint,
    SamplingParams,
    Tool,
    context_sizes,
    embedding_context_sizes,
)

if TYPE_CHECKING:
    from modeld.prompt_cache.cache import ModelPromptCache

__all__ = ["EngineSettings", "LlamaEngine"]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    n_ctx: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int
    use_mmap: bool = True
    # llama-cpp-python points fd 1 and 2 at /dev/null during a load unless verbose: a
    # probe load (a child process) wants llama.cpp's abort message on its stderr.
    verbose: bool = False
    prompt_reuse: bool = True


class LlamaEngine:
    """Owns one ``llama_cpp.Llama`` and runs its generations.

    The thread that constructs it owns it: every other method but :meth:`new_ring`
    raises :class:`NotOwnerThread` when called from another thread. A generation is
    :meth:`prepare_request` (or its parts: :meth:`prepare`, :meth:`prepare_chat`,
    :meth:`check_grammar`), then :meth:`generate` with a ring from :meth:`new_ring`.
    Between generations the context keeps its KV cache, and the engine remembers which
    tokens it holds, so that the next prompt evaluates only what follows their common
    prefix (``prompt_reuse``). :meth:`embed` runs in a second context on the same
    weights, made on first use.

    ``path`` is what llama.cpp opens (``/proc/self/fd/N`` for a bound file); ``label``
    names the model in messages (default: the path's last component).
    """

    def __init__(
        self,
        path: Path | str,
        settings: EngineSettings,
        loop: TokenLoop,
        n_ctx_train: int,
        *,
        label: str | None = None,
    ) -> None:
        self._owner = threading.get_ident()
        self._loop = loop
        self.label = label or Path(path).name
        self.sizes = context_sizes(settings.n_ctx, settings.n_batch, n_ctx_train)
        self._llama = load_llama(
            str(path),
            self.label,
            model_path=str(path),
            n_ctx=self.sizes.n_ctx,
            n_batch=self.sizes.n_batch,
            n_ubatch=self.sizes.n_ubatch,
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            use_mmap=settings.use_mmap,
            # llama.cpp's default, stated: sliding-window layers keep every position
            # (the memory estimate counts them so), so a kept prompt prefix never
            # lacks the cells its window reaches back to (see kv_prefix.py)
            swa_full=True,
            verbose=settings.verbose,
        )
        # llama.cpp's own count of its weight bytes (read once, here, on the owner thread)
        self.model_size_bytes = int(llama_cpp.llama_model_size(self._llama.model))
        self.tokenizer = Tokenizer(self._llama._model.vocab, self.sizes.n_ctx)
        self.max_prompt_bytes = self.tokenizer.max_prompt_bytes
        self._chat = ChatFormatter(
            self._llama.file_metadata,
            bos_token=self.tokenizer.token_text(self._llama.token_bos()),
            eos_token=self.tokenizer.token_text(self._llama.token_eos()),
        )
        self._embedding = LazyEmbedding(
            self._llama.model,
            embedding_context_sizes(self.sizes),
            settings.n_threads,
            pooling_for(llama_cpp.llama_pooling_type(self._llama.ctx)),
        )
        self._prompts = PromptTokens(self.tokenizer, self._chat)
        self.threads = ContextThreads(self._llama.ctx, self._embedding, self._check_open)
        self._prompt_reuse = settings.prompt_reuse
        # The tokens whose KV the context holds, in position order. Only generate() keeps
        # it true; anything else that uses the context must call forget_kv().
        self._kv_tokens: Sequence[int] = ()
        # the second tier, attached by the loader
        self.cache_tier = CacheTier(self._llama, lambda: self._kv_tokens, lambda: self._closed)
        self._closed = False

    def _check_owner(self) -> None:
        if threading.get_ident() != self._owner:
            raise NotOwnerThread(
                f"{self.label}: the engine belongs to thread {self._owner}, "
                f"not {threading.get_ident()}"
            )

    def _check_open(self) -> None:
        """Raises :class:`NotOwnerThread` off the owner thread, :class:`EngineClosed`
        after :meth:`close`."""
        self._check_owner()
        if self._closed:
            raise EngineClosed("the engine is closed")

    @property
    def n_ctx(self) -> int:
        return self.sizes.n_ctx

    def prepare_request(self, request: Request, recipe: Recipe) -> PreparedRequest:
        """:func:`~modeld.engine.preparation.prepare_from_parts` on this engine."""
        return prepare_from_parts(self, request, recipe)

    def attach_prompt_cache(self, cache: ModelPromptCache | None) -> None:
        """Save and restore sequence states through ``cache`` (None: stop)."""
        self.cache_tier.cache = cache if self._prompt_reuse else None

    def prepare(
        self, prompt: str, max_tokens: int | None = None, *, truncate: bool = False
    ) -> list[int]:
        """The prompt's tokens (:meth:`PromptTokens.of_prompt`). Raises
        :class:`ContextLengthExceeded` (``prompt``) when it leaves no room for one token,
        :class:`InvalidRequest` for invalid Unicode, :class:`EngineClosed` after close."""
        self._check_open()
        return self._prompts.of_prompt(prompt, max_tokens, truncate)

    def prepare_chat(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int | None,
        chat_template: str | None,
        tools: Sequence[Tool] = (),
        *,
        truncate: bool = False,
    ) -> list[int]:
        """:meth:`prepare` for a conversation through the model's chat template (``tools``
        handed to it, :mod:`modeld.tools`). Raises :class:`NoChatTemplate`,
        :class:`ChatTemplateError`, and what :meth:`prepare` does, naming ``messages``."""
        self._check_open()
        return self._prompts.of_chat(messages, max_tokens, chat_template, truncate, tools)

    def chat_template_source(self, chat_template: str | None) -> str | None:
        """The Jinja source :meth:`prepare_chat` renders with ``chat_template`` (None for a
        llama.cpp built-in): what :func:`modeld.tools.resolve_format` reads."""
        self._check_open()
        return self._chat.template_source(chat_template)

    def check_grammar(self, grammar: str | GrammarConstraint, field: str = "format") -> None:
        """Raises :class:`InvalidRequest` (naming ``field``) if llama.cpp refuses it (a
        lazy grammar is built with its trigger patterns)."""
        self._check_open()
        check_grammar(self._llama._model.vocab, grammar, field)

    def tokenize(
        self, prompt: str, *, add_bos: bool | None = None, field: str = "prompt"
    ) -> list[int]:
        """:meth:`Tokenizer.tokenize` on the owner thread."""
        self._check_owner()
        return self.tokenizer.tokenize(prompt, add_bos=add_bos, field=field)

    def new_ring(self, capacity_bytes: int = RING_CAPACITY_BYTES) -> TokenRing:
        """A ring this engine's loop writes into; any thread (the event loop's, usually).

        Raises :class:`ResourcesExhausted` when no descriptor is left for its wake-up fd.
        """
        try:
            return self._loop.new_ring(capacity_bytes)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise ResourcesExhausted(f"out of file descriptors: {exc.strerror}") from exc
            raise

    def generate(
        self,
        ring: TokenRing,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        grammar: str | GrammarConstraint | None = None,
    ) -> LoopOutcome:
        """Run the token loop into ``ring``, then finish the ring, whatever happens.

        ``max_tokens=None`` (or one beyond the room left) runs until the context is full;
        ``grammar`` (checked by
        :meth:`check_grammar`) constrains every token. Raises only :class:`NotOwnerThread`
        (before touching anything): a failure comes back as ``StopCode.ERROR`` with its
        message, so the consumer always sees the stream end with an outcome.
        """
        self._check_owner()
        held = self._kv_tokens
        cached = reusable_prefix(held, prompt_tokens) if self._prompt_reuse else 0
        self.forget_kv()  # unknown until the loop says what it left
        try:
            if self._closed:
                raise EngineClosed("the engine is closed")
            cached = self.cache_tier.restore(held, prompt_tokens, cached, ring)
            room = self.tokenizer.room(len(prompt_tokens), params.max_tokens)
            if params.max_tokens != room:  # None, or more than the context has left
                params = msgspec.structs.replace(params, max_tokens=room)
            outcome = self._loop.run(
                self._llama, ring, prompt_tokens, params, grammar, cached=cached
            )
            self._kv_tokens = outcome.kv_tokens or ()
            return outcome
        except Exception as exc:
            return LoopOutcome(StopCode.ERROR, len(prompt_tokens), 0, 0.0, 0.0, error=repr(exc))
        finally:
            ring.finish()

    def forget_kv(self) -> None:
        """The next generation starts from an empty KV cache (its loop clears it)."""
        self._kv_tokens = ()

    def warm_up(self) -> None:
        """One token through the whole graph, so the first request pays no first-use cost."""
        self._check_owner()
        ring = self.new_ring(4096)
        try:
            tokens = self.tokenize("warm up") or [0]
            outcome = self.generate(ring, tokens, SamplingParams(max_tokens=1, temperature=0.0))
        finally:
            ring.close()
            self.forget_kv()  # no request should find the warm-up's tokens in the cache
        if outcome.error:
            raise ModelLoadFailed(f"warm-up generation failed: {outcome.error}")

    @property
    def embedding_tokens(self) -> int:
        """The most tokens one embedding input may have (one batch)."""
        return embedding_context_sizes(self.sizes).n_ubatch

    def embed(
        self,
        inputs: Sequence[EmbeddingInput],
        cancelled: Callable[[], bool],
        *,
        truncate: bool = False,
    ) -> tuple[list[list[float]], int]:
        """L2-normalised embeddings of ``inputs`` (texts, or this model's token ids) and
        their token count (:func:`embed_inputs`), in a second context on these weights
        made on first use. Raises :class:`InvalidRequest` (``input``: empty, an id not in
        the vocabulary), :class:`ContextLengthExceeded`, :class:`ClientDisconnected`
        once ``cancelled()``, :class:`ResourcesExhausted`, :class:`EngineError`."""
        self._check_open()
        limit = self.embedding_tokens
        tokenized = [
            self.tokenizer.embedding_tokens(item, i, limit, truncate=truncate)
            for i, item in enumerate(inputs)
        ]
        return self._embedding.embed_all(tokenized, cancelled), sum(len(t) for t in tokenized)

    def close(self) -> None:
        """Free the contexts and the weights now, not at garbage collection."""
        self._check_owner()
        if self._closed:
            return
        self._closed = True
        self.threads.close()
        self.cache_tier.save_at_close(self._kv_tokens)
        self._embedding.close()  # it points into the weights freed next
        self._llama.close()
        del self._llama
        malloc_trim()
