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
from modeld.engine.chat_format import ChatFormatter
from modeld.engine.contract import PreparedRequest, Recipe, Request
from modeld.engine.embedding import EmbeddingContext, embed_inputs, pooling_for
from modeld.engine.fitting import PromptTokens
from modeld.engine.grammar import check_grammar
from modeld.engine.kv_prefix import reusable_prefix
from modeld.engine.llama_load import load_llama, malloc_trim
from modeld.engine.tokens import Tokenizer
from modeld.errors import ModelLoadFailed, ResourcesExhausted
from modeld.types import (
    ChatMessage,
    ChatRequest,
    EmbeddingInput,
    SamplingParams,
    context_sizes,
    embedding_context_sizes,
)

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
        self._n_threads = settings.n_threads
        self.tokenizer = Tokenizer(self._llama._model.vocab, self.sizes.n_ctx)
        self.max_prompt_bytes = self.tokenizer.max_prompt_bytes
        self._chat = ChatFormatter(
            self._llama.file_metadata,
            bos_token=self._token_text(self._llama.token_bos()),
            eos_token=self._token_text(self._llama.token_eos()),
        )
        self._prompts = PromptTokens(self.tokenizer, self._chat)
        self._embedding: EmbeddingContext | None = None
        self._prompt_reuse = settings.prompt_reuse
        # The tokens whose KV the context holds, in position order. Only generate() keeps
        # it true; anything else that uses the context must call forget_kv().
        self._kv_tokens: Sequence[int] = ()
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
        """The request's tokens (its prompt, or its messages through ``recipe``'s chat
        template), checked against the context (or, with ``request.truncate``, fitted
        into it as Ollama does), and its grammar against the vocabulary.

        Raises what :meth:`prepare`, :meth:`prepare_chat` and :meth:`check_grammar` do.
        """
        if isinstance(request, ChatRequest):
            tokens = self.prepare_chat(
                request.messages,
                request.max_tokens,
                recipe.chat_template,
                truncate=request.truncate,
            )
        else:
            tokens = self.prepare(request.prompt, request.max_tokens, truncate=request.truncate)
        if recipe.grammar is not None:
            self.check_grammar(recipe.grammar, "grammar" if request.grammar else "format")
        return PreparedRequest(tokens, request, recipe.grammar)

    def prepare(
        self, prompt: str, max_tokens: int | None = None, *, truncate: bool = False
    ) -> list[int]:
        """The prompt's tokens (:meth:`PromptTokens.of_prompt`: with ``truncate``, its
        end that leaves ``max_tokens`` room). A ``max_tokens`` beyond the room left is a
        cap (:meth:`generate`). Raises :class:`ContextLengthExceeded` (field ``prompt``)
        when the prompt leaves no room for one token, :class:`InvalidRequest` when it is
        not valid Unicode, :class:`EngineClosed` after :meth:`close`."""
        self._check_open()
        return self._prompts.of_prompt(prompt, max_tokens, truncate)

    def prepare_chat(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int | None,
        chat_template: str | None,
        *,
        truncate: bool = False,
    ) -> list[int]:
        """:meth:`prepare` for a conversation rendered through the model's chat template
        (``chat_template``: the operator's override, a built-in name or a Jinja file).
        Raises :class:`NoChatTemplate`, :class:`ChatTemplateError`, and what
        :meth:`prepare` does, naming ``messages``."""
        self._check_open()
        return self._prompts.of_chat(messages, max_tokens, chat_template, truncate)

    def check_grammar(self, grammar: str, field: str = "format") -> None:
        """Raises :class:`InvalidRequest` (field ``format``) if llama.cpp refuses it."""
        self._check_open()
        check_grammar(self._llama._model.vocab, grammar, field)

    def tokenize(
        self, prompt: str, *, add_bos: bool | None = None, field: str = "prompt"
    ) -> list[int]:
        """:meth:`Tokenizer.tokenize` on the owner thread."""
        self._check_owner()
        return self.tokenizer.tokenize(prompt, add_bos=add_bos, field=field)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return str(self._llama._model.token_get_text(token))

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
        grammar: str | None = None,
    ) -> LoopOutcome:
        """Run the token loop into ``ring``, then finish the ring, whatever happens.

        ``max_tokens=None`` (or one beyond the room left) runs until the context is full;
        ``grammar`` (checked by
        :meth:`check_grammar`) constrains every token. Raises only :class:`NotOwnerThread`
        (before touching anything): a failure comes back as ``StopCode.ERROR`` with its
        message, so the consumer always sees the stream end with an outcome.
        """
        self._check_owner()
        cached = reusable_prefix(self._kv_tokens, prompt_tokens) if self._prompt_reuse else 0
        self.forget_kv()  # unknown until the loop says what it left
        try:
            if self._closed:
                raise EngineClosed("the engine is closed")
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
        return embed_inputs(self.tokenizer, self._embedder, limit, inputs, cancelled, truncate)

    def _embedder(self) -> EmbeddingContext:
        if self._embedding is None:
            self._embedding = EmbeddingContext(
                self._llama.model,
                embedding_context_sizes(self.sizes),
                self._n_threads,
                pooling_for(llama_cpp.llama_pooling_type(self._llama.ctx)),
            )
        return self._embedding

    def close(self) -> None:
        """Free the contexts and the weights now, not at garbage collection."""
        self._check_owner()
        if self._closed:
            return
        self._closed = True
        if self._embedding is not None:
            self._embedding.close()  # it points into the weights freed next
        self._llama.close()
        del self._llama
        malloc_trim()
