"""The adapter to llama-cpp-python: one model + context, used only from its owner thread.

llama.cpp failures are translated here, once, into modeld errors (``raise ... from``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import llama_cpp
import msgspec
from loguru import logger

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
from modeld.engine.embedding import EmbeddingContext, pooling_for
from modeld.engine.grammar import check_grammar
from modeld.engine.kv_prefix import reusable_prefix
from modeld.errors import ClientDisconnected, InvalidRequest, ModelLoadFailed, ResourcesExhausted
from modeld.redact import redact_paths
from modeld.types import ChatMessage, SamplingParams, context_sizes, embedding_context_sizes

if TYPE_CHECKING:
    from modeld.prompt_cache.cache import ModelPromptCache

__all__ = ["EngineSettings", "LlamaEngine"]

# ggml_log_level in the llama.cpp this release vendors (ggml.h): 1 debug, 2 info, 3 warn,
# 4 error, 5 continuation. (llama-cpp-python's own mapping still follows an older enum.)
_LLAMA_LOG_LEVELS = {3: "WARNING", 4: "ERROR"}


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's warnings and errors as modeld log records instead of raw stderr text;
    its info and debug chatter (hundreds of lines per load) is dropped at the source."""
    name = _LLAMA_LOG_LEVELS.get(level)
    message = text.decode("utf-8", "replace").strip() if name else ""
    if name and message:
        # "{}": llama.cpp text may hold braces, which loguru would take as a format
        logger.log(name, "{}", redact_paths(message), source="llama.cpp")


llama_cpp.llama_log_set(_route_llama_log, ctypes.c_void_p(0))


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
    :meth:`prepare` or :meth:`prepare_chat` (tokenize and check against the context;
    :meth:`check_grammar` for structured output), then :meth:`generate` with a ring from
    :meth:`new_ring`. Between generations the context keeps its KV cache, and the engine
    remembers which tokens it holds, so that the next prompt evaluates only what follows
    their common prefix (``prompt_reuse``). :meth:`embed` runs in a second context on the
    same weights, made on first use.

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
        self._llama = _load_llama(
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
        self._vocab = self._llama._model.vocab
        # llama.cpp's own count of its weight bytes (read once, here, on the owner thread)
        self.model_size_bytes = int(llama_cpp.llama_model_size(self._llama.model))
        self._n_threads = settings.n_threads
        self._chat = ChatFormatter(
            self._llama.metadata,
            bos_token=self._token_text(self._llama.token_bos()),
            eos_token=self._token_text(self._llama.token_eos()),
        )
        self._embedding: EmbeddingContext | None = None
        # No token covers more bytes than the longest piece, so a prompt longer than
        # n_ctx pieces cannot fit the context: refused before the tokenizer (whose cost
        # grows faster than linearly on some inputs) ever sees it.
        self.max_prompt_bytes = self.n_ctx * _longest_piece_bytes(self._vocab)
        self._prompt_reuse = settings.prompt_reuse
        # The tokens whose KV the context holds, in position order. Only generate() keeps
        # it true; anything else that uses the context must call forget_kv().
        self._kv_tokens: Sequence[int] = ()
        # The second tier behind the context's own KV (modeld/prompt_cache): set by the
        # loader, used only when prompt_reuse is on.
        self._prompt_cache: ModelPromptCache | None = None
        self._closed = False

    def _check_owner(self) -> None:
        if threading.get_ident() != self._owner:
            raise NotOwnerThread(
                f"{self.label}: the engine belongs to thread {self._owner}, "
                f"not {threading.get_ident()}"
            )

    @property
    def n_ctx(self) -> int:
        return self.sizes.n_ctx

    def attach_prompt_cache(self, cache: ModelPromptCache | None) -> None:
        """Save and restore sequence states through ``cache`` (None: stop)."""
        self._prompt_cache = cache

    def prepare(self, prompt: str, max_tokens: int | None) -> list[int]:
        """The prompt's tokens, checked against the context.

        Raises :class:`InvalidRequest` (field ``prompt``) when the prompt is not valid
        Unicode or cannot fit the context, and (field ``max_tokens``) when the prompt
        plus ``max_tokens`` does not (``None``: the prompt must leave room for one
        token); :class:`EngineClosed` after :meth:`close`.
        """
        self._check_owner()
        if self._closed:
            raise EngineClosed("the engine is closed")
        tokens = self.tokenize(prompt)
        self._check_room(tokens, max_tokens, "prompt")
        return tokens

    def prepare_chat(
        self, messages: Sequence[ChatMessage], max_tokens: int | None, chat_template: str | None
    ) -> list[int]:
        """:meth:`prepare` for a conversation rendered through the model's chat template
        (``chat_template``: the operator's override, a built-in name or a Jinja file).

        The rendered text is tokenized with control tokens parsed and no second BOS when
        the template wrote one. Raises :class:`NoChatTemplate`, :class:`ChatTemplateError`,
        and :class:`InvalidRequest` as :meth:`prepare` does, naming ``messages``.
        """
        self._check_owner()
        if self._closed:
            raise EngineClosed("the engine is closed")
        text = self._chat.render(messages, chat_template, max_chars=self.max_prompt_bytes)
        bos = self._chat.bos_token
        add_bos = self._add_bos and not (bos and text.startswith(bos))
        tokens = self.tokenize(text, add_bos=add_bos, field="messages")
        self._check_room(tokens, max_tokens, "messages")
        return tokens

    def check_grammar(self, grammar: str) -> None:
        """Raises :class:`InvalidRequest` (field ``format``) if llama.cpp refuses it."""
        self._check_owner()
        if self._closed:
            raise EngineClosed("the engine is closed")
        check_grammar(self._vocab, grammar)

    def _check_room(self, tokens: list[int], max_tokens: int | None, field: str) -> None:
        if max_tokens is None:
            if len(tokens) >= self.n_ctx:
                raise InvalidRequest(
                    f"{field} ({len(tokens)} tokens) leaves no room in the context of "
                    f"{self.n_ctx} tokens",
                    field=field,
                )
        elif len(tokens) + max_tokens > self.n_ctx:
            raise InvalidRequest(
                f"{field} ({len(tokens)} tokens) + max_tokens ({max_tokens}) "
                f"exceeds the context of {self.n_ctx} tokens",
                field="max_tokens",
            )

    @property
    def _add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    def tokenize(
        self, prompt: str, *, add_bos: bool | None = None, field: str = "prompt"
    ) -> list[int]:
        """Tokens of ``prompt`` through a buffer bounded by n_ctx (never by model metadata),
        control tokens parsed; ``add_bos`` defaults to what the vocabulary asks for.

        Raises :class:`InvalidRequest` (naming ``field``) when the prompt cannot be
        encoded or is too long.
        """
        self._check_owner()
        text = self._encoded(prompt, field)
        if len(text) > self.max_prompt_bytes:
            raise InvalidRequest(
                f"{field} is {len(text)} bytes; no {self.n_ctx}-token context holds more "
                f"than {self.max_prompt_bytes} bytes of this model's tokens",
                field=field,
            )
        add_bos = self._add_bos if add_bos is None else add_bos
        count, tokens = self._tokenize(text, self.n_ctx, add_bos, parse_special=True)
        if count < 0:
            raise InvalidRequest(
                f"{field} is {-count} tokens; the context holds {self.n_ctx}", field=field
            )
        return tokens

    def _tokenize(
        self, text: bytes, capacity: int, add_special: bool, *, parse_special: bool
    ) -> tuple[int, list[int]]:
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(
            self._vocab, text, len(text), buffer, capacity, add_special, parse_special
        )
        return count, list(buffer[: max(count, 0)])

    @staticmethod
    def _encoded(text: str, field: str) -> bytes:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"{field} is not valid Unicode", field=field) from exc

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

        ``max_tokens=None`` runs until the context is full; ``grammar`` (checked by
        :meth:`check_grammar`) constrains every token. Raises only :class:`NotOwnerThread`
        (before touching anything): a failure comes
        back as ``StopCode.ERROR`` with its message, so the consumer always sees the
        stream end with an outcome.
        """
        self._check_owner()
        held = self._kv_tokens
        cached = reusable_prefix(held, prompt_tokens) if self._prompt_reuse else 0
        self.forget_kv()  # unknown until the loop says what it left
        try:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if self._prompt_cache is not None and self._prompt_reuse:
                cached = self._from_prompt_cache(held, prompt_tokens, cached, ring)
            if params.max_tokens is None:
                room = max(1, self.n_ctx - len(prompt_tokens))
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

    def _from_prompt_cache(
        self, held: Sequence[int], prompt_tokens: Sequence[int], live: int, ring: TokenRing
    ) -> int:
        """The prefix to keep once the prompt cache has saved what this prompt would
        discard and restored a longer prefix than the context holds (0 after a failure:
        the loop then clears the context)."""
        assert self._prompt_cache is not None
        try:
            cached, _ = self._prompt_cache.prepare(
                self._llama, held, prompt_tokens, live, lambda: ring.cancelled
            )
        except Exception as exc:  # the cache is an optimisation: never fail a generation
            logger.warning("prompt cache failed; evaluating afresh", error=repr(exc))
            return 0
        return cached

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
        self, texts: Sequence[str], cancelled: Callable[[], bool]
    ) -> tuple[list[list[float]], int]:
        """L2-normalised embeddings of ``texts`` and their token count, in a second
        context on these weights (made on first use, kept until :meth:`close`).

        Every input is tokenized and checked before any is computed. ``cancelled`` is
        asked between inputs. Raises :class:`InvalidRequest` (field ``input``) for an
        empty or too long input, :class:`ClientDisconnected` once ``cancelled()``,
        :class:`ResourcesExhausted` when the context cannot be made, :class:`EngineError`.
        """
        self._check_owner()
        if self._closed:
            raise EngineClosed("the engine is closed")
        limit = self.embedding_tokens
        inputs = [self._embedding_tokens(text, index, limit) for index, text in enumerate(texts)]
        if self._embedding is None:
            self._embedding = EmbeddingContext(
                self._llama.model,
                embedding_context_sizes(self.sizes),
                self._n_threads,
                pooling_for(llama_cpp.llama_pooling_type(self._llama.ctx)),
            )
        vectors: list[list[float]] = []
        for tokens in inputs:
            if cancelled():
                raise ClientDisconnected("the embedding request was cancelled")
            vectors.append(self._embedding.embed(tokens))
        return vectors, sum(len(tokens) for tokens in inputs)

    def _embedding_tokens(self, text: str, index: int, limit: int) -> list[int]:
        """One input's tokens: the vocabulary's own BOS/EOS, its text taken literally."""
        field = "input"
        data = self._encoded(text, field)
        if len(data) > limit * self.max_prompt_bytes // self.n_ctx:
            raise InvalidRequest(
                f"input {index} is {len(data)} bytes, more than {limit} tokens can hold",
                field=field,
            )
        count, tokens = self._tokenize(data, limit, True, parse_special=False)
        if count < 0:
            raise InvalidRequest(
                f"input {index} is {-count} tokens; an embedding input holds at most {limit} "
                "(--n-batch)",
                field=field,
            )
        if count == 0:
            raise InvalidRequest(f"input {index} is empty", field=field)
        return tokens

    def close(self) -> None:
        """Free the contexts and the weights now, not at garbage collection."""
        self._check_owner()
        if self._closed:
            return
        self._closed = True
        if self._prompt_cache is not None and self._prompt_reuse and self._kv_tokens:
            try:  # the context's prefix outlives the instance (eviction, idle unload)
                self._prompt_cache.save(self._llama, self._kv_tokens)
            except Exception as exc:
                logger.warning("prompt cache: saving at close failed", error=repr(exc))
        if self._embedding is not None:
            self._embedding.close()  # it points into the weights freed next
        self._llama.close()
        del self._llama
        _malloc_trim()


def _load_llama(path: str, label: str, **params: Any) -> llama_cpp.Llama:
    """``Llama(**params)``, and on any failure whatever it allocated is freed now.

    A ``Llama`` whose ``__init__`` raises has often created its model and context
    already (a ``MemoryError`` from its logits array comes last); the exception's
    traceback keeps the half-built object alive for as long as the exception lives, so
    that memory stayed held (about 1 GB of address space for Gemma) while the budget
    counted it free. Here the object is closed, the traceback dropped (the cause is kept
    for its type and message), and the heap trimmed.
    Raises :class:`ModelLoadFailed` (paths in llama.cpp's message become ``label``).
    """
    llama = llama_cpp.Llama.__new__(llama_cpp.Llama)
    try:
        llama.__init__(**params)  # type: ignore[misc]
    except (Exception, MemoryError) as exc:
        message = _failure_message(exc, path, label)
        if hasattr(llama, "_stack"):
            with contextlib.suppress(Exception):
                llama.close()
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        del llama
        _malloc_trim()
        raise ModelLoadFailed(message) from exc
    return llama


def _failure_message(error: BaseException, path: str, label: str) -> str:
    if isinstance(error, MemoryError):
        return f"{label}: out of memory while llama.cpp loaded it ({error})"
    if isinstance(error, jinja2.TemplateError):  # llama-cpp-python compiles it (never runs it)
        return redact_paths(
            f"{label}: llama-cpp-python cannot compile the file's chat template: {error}"
        )
    text = str(error).replace(path, label)
    return redact_paths(f"llama.cpp could not load {label}: {text}")


def _longest_piece_bytes(vocab: object) -> int:
    """The most bytes any one token stands for (special tokens rendered as text)."""
    size_bytes = 256
    buffer = (ctypes.c_char * size_bytes)()
    longest = 1
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        count = llama_cpp.llama_token_to_piece(vocab, token, buffer, size_bytes, 0, True)
        if count < 0:  # longer than the buffer: -count is its size
            count = -count
        longest = max(longest, count)
    return longest


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS so RSS reflects what is really held."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
