"""The prompt cache as the engine's second tier behind its context's own KV: what a
prompt would discard is saved, and a longer cached prefix than the context holds is
restored before the loop runs (:mod:`modeld.prompt_cache`). On the model's worker thread.

A model that goes idle keeps its context's prefix in the memory tier soon after
(:meth:`CacheTier.keep_idle`, scheduled by :func:`modeld.scheduling.idle.keep_prefix`),
so that the prompt that later displaces it (another conversation's turn) finds it saved
and pays only its own restore.

The cache is an optimisation: any failure of it is logged and the prompt is evaluated
afresh; it never fails a generation or a close.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from loguru import logger

from modeld.engine.base import TokenRing

if TYPE_CHECKING:
    from llama_cpp import Llama

    from modeld.prompt_cache.cache import ModelPromptCache

__all__ = ["CacheTier"]


class CacheTier:
    """One engine's view of its model's prompt cache (none until the loader attaches it).

    ``live_tokens`` says which tokens the context holds, ``closed`` whether the engine
    is closed (both read on the owner thread, or between generations)."""

    def __init__(
        self, llama: Llama, live_tokens: Callable[[], Sequence[int]], closed: Callable[[], bool]
    ) -> None:
        self._llama = llama
        self._live_tokens = live_tokens
        self._closed = closed
        self.cache: ModelPromptCache | None = None

    def restore(
        self, held: Sequence[int], prompt_tokens: Sequence[int], live: int, ring: TokenRing
    ) -> int:
        """The prefix the loop may keep: ``live`` (what the context already shares with the
        prompt) unless the cache restored a longer one; 0 after a failure (the loop then
        clears the context)."""
        if self.cache is None:
            return live
        try:
            cached, _ = self.cache.prepare(
                self._llama, held, prompt_tokens, live, lambda: ring.cancelled
            )
        except Exception as exc:
            logger.warning("prompt cache failed; evaluating afresh", error=repr(exc))
            return 0
        return cached

    def worth_keeping(self) -> bool:
        """Between generations, on any thread: whether :meth:`keep_idle` would keep
        anything (a memory tier, a prefix long enough), so an idle model whose prefix
        is not worth it costs its worker no call at all."""
        cache = self.cache
        return cache is not None and cache.keeps_in_memory(len(self._live_tokens()))

    def keep_idle(self, still_idle: Callable[[], bool]) -> None:
        """On the owner thread, while nothing waits for the model: the context's prefix
        into the memory tier (its disk write waits until it is displaced or the engine
        closes). Skipped once a request is waiting (``still_idle()`` false): it would
        wait for the copy."""
        if self.cache is None or self._closed() or not still_idle():
            return
        try:
            self.cache.save(self._llama, self._live_tokens(), to_disk=False)
        except Exception as exc:
            logger.warning("prompt cache: keeping an idle prefix failed", error=repr(exc))

    def save_at_close(self, kv_tokens: Sequence[int]) -> None:
        """The context's prefix outlives the instance (eviction, idle unload, shutdown)."""
        if self.cache is None or not kv_tokens:
            return
        try:
            self.cache.save(self._llama, kv_tokens)
        except Exception as exc:
            logger.warning("prompt cache: saving at close failed", error=repr(exc))
