"""The prompt cache as the engine's second tier behind its context's own KV: what a
prompt would discard is saved, and a longer cached prefix than the context holds is
restored before the loop runs (:mod:`modeld.prompt_cache`). On the model's worker thread.

The cache is an optimisation: any failure of it is logged and the prompt is evaluated
afresh; it never fails a generation or a close.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from loguru import logger

from modeld.engine.base import TokenRing

if TYPE_CHECKING:
    from llama_cpp import Llama

    from modeld.prompt_cache.cache import ModelPromptCache

__all__ = ["CacheTier"]


class CacheTier:
    """One engine's view of its model's prompt cache (none until the loader attaches it)."""

    def __init__(self, llama: Llama) -> None:
        self._llama = llama
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

    def save_at_close(self, kv_tokens: Sequence[int]) -> None:
        """The context's prefix outlives the instance (eviction, idle unload, shutdown)."""
        if self.cache is None or not kv_tokens:
            return
        try:
            self.cache.save(self._llama, kv_tokens)
        except Exception as exc:
            logger.warning("prompt cache: saving at close failed", error=repr(exc))
