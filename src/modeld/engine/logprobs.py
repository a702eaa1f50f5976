"""Log probabilities of generated tokens: the Python twin of csrc/logprobs.h.

What is reported is the log-softmax of the raw logits the sampler read at that position,
before penalties, a grammar, top-k/top-p/min-p or temperature change them: the model's
own distribution, which is what OpenAI and llama-server report by default (llama-server's
``post_sampling_probs`` is the other choice). It is computed only when a request asks
(``SamplingParams.logprobs`` not None), from logits llama.cpp already holds, in one pass
over the vocabulary: the likeliest ``n`` are picked without sorting it. Between equal
logits the lower token id comes first, in both loops, so the two agree token for token
(within float rounding: both sum in double and report a float).

An entry goes from a loop to the event loop as ``(id, piece, logprob, ((id, piece,
logprob), ...))`` through the ring's side queue (``push_logprob`` / ``drain_logprobs``)
and is packed into a :class:`~modeld.types.TokenLogprob` there (:func:`entries`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from modeld.logprob_entry import RawTop
from modeld.types import TokenLogprob

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["PIECE_MAX_BYTES", "RawLogprob", "entries", "logprob_entry"]

PIECE_MAX_BYTES = 256
"""An alternative whose piece is longer is reported with an empty one (csrc LP_PIECE_MAX)."""

RawLogprob = tuple[int, bytes, float, tuple[RawTop, ...]]


def _top_ids(logits: np.ndarray, n_top: int) -> list[int]:
    """The ``n_top`` likeliest ids, likeliest first, a lower id first between equals."""
    if n_top <= 0:
        return []
    n_top = min(n_top, logits.size)
    threshold = np.partition(logits, logits.size - n_top)[logits.size - n_top]
    candidates = np.flatnonzero(logits >= threshold)  # every tie at the threshold too
    order = np.lexsort((candidates, -logits[candidates]))
    return [int(i) for i in candidates[order][:n_top]]


def _log_sum_exp(logits: np.ndarray) -> float:
    wide = logits.astype(np.float64)
    top = float(wide.max())
    return top + math.log(float(np.exp(wide - top).sum()))


def logprob_entry(
    llama: Llama, token: int, piece: bytes, n_top: int, piece_of: Callable[[int], bytes]
) -> RawLogprob:
    """The entry of ``token`` (just sampled from the context's last logits)."""
    pointer = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
    logits = np.ctypeslib.as_array(pointer, shape=(llama.n_vocab(),))
    lse = _log_sum_exp(logits)

    def logprob(i: int) -> float:
        return float(np.float32(float(logits[i]) - lse))

    top = []
    for i in _top_ids(logits, n_top):
        alternative = piece_of(i)
        top.append((i, alternative if len(alternative) <= PIECE_MAX_BYTES else b"", logprob(i)))
    return (token, piece, logprob(token), tuple(top))


def entries(raw: list[RawLogprob]) -> list[TokenLogprob]:
    """What a ring's ``drain_logprobs()`` returned, as packed entries."""
    return [TokenLogprob.of(*entry) for entry in raw]
