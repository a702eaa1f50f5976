"""Constrained sampling at free-decoding speed: the Python twin of ``csrc/sampling.h``.

llama.cpp's grammar sampler checks every candidate against the grammar; on Gemma's
262,144-token vocabulary that is most of a step. As llama.cpp's common sampler does
(``common_sampler_sample`` with ``grammar_first=false``), the unconstrained choice is made
first and only the chosen token is checked, with the full constrained pass (the grammar on
every candidate, then the chain) only when the grammar rejects it. The output is token for
token the full pass's:

* greedy: the unconstrained argmax, when the grammar allows it, is the constrained one;
* top-k sampling: the best ``max(256, 4k)`` unconstrained candidates are sorted and
  checked; when ``k`` of them pass, exactly those (the constrained top-k, in order) go to
  the rest of the chain, whose dist sampler draws once as in the full pass, so a seed
  gives the same tokens (llama.cpp's common sampler would draw from the unconstrained
  distribution first, which changes a seed's output);
* anything else (``top_k=0``, ``temperature<0``): the full pass.

Exactly equal logits may be ordered differently (llama.cpp's partial sort leaves their
order unspecified). Everything here runs on the model's worker thread.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from modeld.types import GrammarConstraint, SamplingParams

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["WALK_MIN_CANDIDATES", "FastGrammarSampler", "grammar_sampler"]

WALK_MIN_CANDIDATES = 256
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
_ROOT = b"root"


def grammar_sampler(vocab: object, constraint: GrammarConstraint) -> Any:
    """llama.cpp's grammar sampler for ``constraint`` (lazy when it has triggers); a null
    pointer when llama.cpp refuses the grammar. The caller frees it."""
    text = constraint.gbnf.encode("utf-8")
    if not constraint.lazy:
        return llama_cpp.llama_sampler_init_grammar(vocab, text, _ROOT)
    patterns = (ctypes.c_char_p * max(1, len(constraint.trigger_patterns)))(
        *(p.encode("utf-8") for p in constraint.trigger_patterns)
    )
    tokens = (llama_cpp.llama_token * max(1, len(constraint.trigger_tokens)))(
        *constraint.trigger_tokens
    )
    return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
        vocab, text, _ROOT, patterns, len(constraint.trigger_patterns),
        tokens, len(constraint.trigger_tokens),
    )  # fmt: skip


def _tail_chain(params: SamplingParams, seed: int) -> Any:
    """What follows top-k in llama-cpp-python's chain (``Llama._init_sampler``)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if params.temperature < 0.0:
        add(chain, llama_cpp.llama_sampler_init_dist(seed))
    elif params.temperature == 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        add(chain, llama_cpp.llama_sampler_init_typical(1.0, 1))
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


class FastGrammarSampler:
    """Penalties, a grammar and the rest of llama-cpp-python's chain, applied one by one
    so that a grammar is checked against one token where that decides.

    ``full_pass`` always takes the full constrained pass (today's chain, the reference).
    ``fast_tokens``/``full_passes`` count the two paths. Call :meth:`close` when done.
    """

    def __init__(
        self,
        llama: Llama,
        params: SamplingParams,
        grammar: Any,
        seed: int,
        *,
        full_pass: bool = False,
    ) -> None:
        self._ctx = llama.ctx
        n_vocab = llama.n_vocab()
        self._grammar = grammar
        self._full_pass = full_pass
        self._greedy = params.temperature == 0.0
        self._penalties = llama_cpp.llama_sampler_init_penalties(
            n_vocab, llama.last_n_tokens_size, params.repeat_penalty,
            params.frequency_penalty, params.presence_penalty,
        )  # fmt: skip
        self._tail = _tail_chain(params, seed)
        self._top_k = (
            llama_cpp.llama_sampler_init_top_k(params.top_k) if params.temperature > 0 else None
        )
        walk = max(WALK_MIN_CANDIDATES, 4 * params.top_k)
        self._k = params.top_k if params.temperature > 0 and params.top_k > 0 else 0
        self._walk = (
            llama_cpp.llama_sampler_init_top_k(walk) if self._k and walk < n_vocab else None
        )
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._cur = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._cur_pointer = self._cur.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        self._single = llama_cpp.llama_token_data()
        self.fast_tokens = 0
        self.full_passes = 0

    def close(self) -> None:
        for sampler in (self._penalties, self._grammar, self._top_k, self._walk, self._tail):
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
        self._penalties = self._grammar = self._top_k = self._walk = self._tail = None

    def sample(self) -> int:
        """The next token from the last logits, accepted by every sampler."""
        logits_pointer = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        if not logits_pointer:
            raise RuntimeError("llama.cpp gave no logits to sample from")
        logits = np.ctypeslib.as_array(logits_pointer, shape=(len(self._ids),))
        array = self._fill(logits)
        selected = -1 if self._full_pass else self._fast_choice(array)
        if selected >= 0:
            self.fast_tokens += 1
        else:
            self.full_passes += 1
            array = self._fill(logits)
            self._apply(self._grammar, array)
            if self._top_k is not None:
                self._apply(self._top_k, array)
            self._apply(self._tail, array)
            selected = array.selected
            if not 0 <= selected < array.size:
                raise RuntimeError("the sampler chain selected no token")
        token = int(array.data[selected].id)
        for sampler in (self._penalties, self._grammar, self._top_k, self._tail):
            if sampler is not None:
                llama_cpp.llama_sampler_accept(sampler, token)
        return token

    def _fill(self, logits: np.ndarray[Any, Any]) -> llama_cpp.llama_token_data_array:
        self._cur["id"] = self._ids
        self._cur["logit"] = logits
        self._cur["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=self._cur_pointer, size=len(self._ids), selected=-1, sorted=False
        )
        self._apply(self._penalties, array)
        return array

    @staticmethod
    def _apply(sampler: Any, array: llama_cpp.llama_token_data_array) -> None:
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))

    def _allows(self, token: int) -> bool:
        self._single.id = token  # type: ignore[assignment]
        self._single.logit, self._single.p = 1.0, 0.0
        single = llama_cpp.llama_token_data_array(
            data=ctypes.pointer(self._single), size=1, selected=-1, sorted=False
        )
        self._apply(self._grammar, single)
        return bool(self._single.logit != float("-inf"))

    def _fast_choice(self, array: llama_cpp.llama_token_data_array) -> int:
        """The fast path's choice (an index into the array), or -1 for the full pass."""
        if self._greedy:
            self._apply(self._tail, array)
            ok = array.selected >= 0 and self._allows(int(array.data[array.selected].id))
            return int(array.selected) if ok else -1
        if self._walk is None:
            return -1
        self._apply(self._walk, array)
        self._apply(self._grammar, array)
        data = np.ctypeslib.as_array(
            ctypes.cast(array.data, ctypes.POINTER(ctypes.c_byte)), shape=(array.size * 12,)
        ).view(_TOKEN_DATA)
        allowed = data[data["logit"] != np.float32("-inf")][: self._k]
        if len(allowed) < self._k:
            return -1
        data[: self._k] = allowed
        array.size, array.sorted, array.selected = self._k, True, -1
        self._apply(self._tail, array)
        return int(array.selected)
