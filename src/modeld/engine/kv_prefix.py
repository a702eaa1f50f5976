"""Prompt-prefix reuse: which part of the KV cache a new prompt can keep, and keeping it.

An instance runs one generation at a time, so its context's KV cache still holds the
previous prompt and reply when the next request arrives. A prompt that starts with the
same tokens (a chat resending its history, a shared system prompt) keeps their KV and
evaluates only the rest, as llama-server's ``cache_prompt`` does.

:func:`keep_prefix` is the Python twin of ``keep_cached_prefix()`` in ``csrc/loop.h``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import llama_cpp

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["keep_prefix", "reusable_prefix"]


def reusable_prefix(held: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading tokens of ``prompt`` the KV cache already holds (``held`` is its
    content in position order), leaving at least one to evaluate: the first token is
    sampled from the logits of the prompt's last one."""
    limit = min(len(held), len(prompt) - 1)
    n = 0
    while n < limit and held[n] == prompt[n]:
        n += 1
    return n


def keep_prefix(llama: Llama, cached: int) -> int:
    """Keep the KV of the first ``cached`` positions and drop the rest where llama.cpp can
    do that exactly; otherwise clear the cache. Returns the tokens kept.

    Exact means: the cut succeeded (a recurrent memory cannot cut a sequence), the
    sequence now ends where the prefix does, and it still reaches back as far as a sliding
    window from the first new token looks (a window cache may have dropped older cells;
    this is llama-server's rule).
    """
    memory = llama_cpp.llama_get_memory(llama.ctx)
    n_swa = llama_cpp.llama_model_n_swa(llama.model)
    oldest_needed = cached - n_swa if 0 < n_swa < cached else 0
    if (
        cached > 0
        and llama_cpp.llama_memory_seq_rm(memory, 0, cached, -1)
        and llama_cpp.llama_memory_seq_pos_max(memory, 0) == cached - 1
        and llama_cpp.llama_memory_seq_pos_min(memory, 0) <= oldest_needed
    ):
        return cached
    llama_cpp.llama_memory_clear(memory, True)
    return 0
