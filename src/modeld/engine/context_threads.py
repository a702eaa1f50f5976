"""The threads one engine's llama.cpp contexts run on, as the thread budget leases them
(:mod:`modeld.scheduling.threads`).

``llama_set_n_threads`` sets two int32 fields of a context that llama.cpp reads at the
start of each decode: cheap enough to call before every piece of work, and the one
thing another thread may do to a context while its owner generates (the budget shares
the cores anew when other work starts or ends), guarded against the context's close.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import llama_cpp

from modeld.engine.embedding import LazyEmbedding
from modeld.engine.openmp import release_pool

__all__ = ["ContextThreads"]


class ContextThreads:
    """``check_owner`` raises off the engine's owner thread (or once it is closed)."""

    def __init__(
        self, ctx: object, embedding: LazyEmbedding, check_owner: Callable[[], None]
    ) -> None:
        self._ctx = ctx
        self._embedding = embedding
        self._check_owner = check_owner
        self._lock = threading.Lock()
        self._closed = False

    def use(self, n_threads: int) -> None:
        """Owner thread: the next decodes (generation and embedding) run on
        ``n_threads``."""
        self._check_owner()
        llama_cpp.llama_set_n_threads(self._ctx, n_threads, n_threads)
        self._embedding.use_threads(n_threads)

    def retune(self, n_threads: int) -> None:
        """Any thread: the running work's next decode (a generation's next token, an
        embedding's next input) runs on ``n_threads``. Ignored once :meth:`close` has
        begun."""
        with self._lock:
            if not self._closed:
                llama_cpp.llama_set_n_threads(self._ctx, n_threads, n_threads)
                self._embedding.use_threads(n_threads)

    def release_pool(self) -> bool:
        """Owner thread, no work running: free the OpenMP pool this thread keeps
        (:func:`~modeld.engine.openmp.release_pool`)."""
        self._check_owner()
        return release_pool()

    def close(self) -> None:
        """Before the context is freed: no :meth:`retune` touches it afterwards."""
        with self._lock:
            self._closed = True
