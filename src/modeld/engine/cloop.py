"""The C token loop: one call into ``_tokenloop`` per generation, with the GIL released.

It does what :class:`~modeld.engine.pyloop.PythonTokenLoop` does (same sampler chain, same
stop rules, same outcome), without touching Python per token. The extension is not linked
against llama.cpp; it resolves llama.cpp's functions from the library llama-cpp-python has
loaded, so it only runs with the llama-cpp-python version whose ``llama.h`` it was written
against. Anything else raises :class:`~modeld.errors.TokenLoopUnavailable`, never a silent
fallback (see docs/c-extension.md).
"""

from __future__ import annotations

import ctypes
import importlib
import secrets
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import llama_cpp
import msgspec

from modeld.engine.base import RING_CAPACITY_BYTES, LoopOutcome, StopCode, TokenRing
from modeld.errors import TokenLoopUnavailable
from modeld.types import GrammarConstraint, LoopKind, SamplingParams, as_constraint

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["SUPPORTED_LLAMA_CPP_VERSION", "CTokenLoop"]

SUPPORTED_LLAMA_CPP_VERSION = "0.3.36"
_REMEDY = (
    "reinstall modeld (pip install --force-reinstall modeld) or set the token loop to 'python'"
)


def _load_extension() -> ModuleType:
    """Import the extension and bind it to the loaded libllama, or say why it cannot run."""
    version = getattr(llama_cpp, "__version__", "unknown")
    if version != SUPPORTED_LLAMA_CPP_VERSION:
        raise TokenLoopUnavailable(
            f"the C token loop was written for llama-cpp-python {SUPPORTED_LLAMA_CPP_VERSION}, "
            f"but {version} is installed; install {SUPPORTED_LLAMA_CPP_VERSION} or set the "
            "token loop to 'python'"
        )
    try:
        extension = importlib.import_module("modeld.engine._tokenloop")
    except ImportError as exc:
        raise TokenLoopUnavailable(
            f"the C token loop extension is not built or cannot be imported ({exc}); {_REMEDY}"
        ) from exc
    try:
        extension.bind(llama_cpp.llama_cpp._lib._name)
    except (ImportError, AttributeError, OSError) as exc:
        raise TokenLoopUnavailable(
            f"the C token loop cannot use this llama.cpp library ({exc}); {_REMEDY}"
        ) from exc
    return extension


def _address(pointer: Any) -> int:
    """The address behind a ctypes pointer or plain int that llama-cpp-python hands out."""
    value = ctypes.cast(pointer, ctypes.c_void_p).value
    if not value:
        raise ValueError("the Llama object is closed (null context or vocab)")
    return int(value)


class CTokenLoop:
    """The token loop in C. Construct it through ``modeld.engine.select.token_loop``.

    Raises :class:`TokenLoopUnavailable` from the constructor when it cannot run here.
    """

    kind = LoopKind.C

    def __init__(self) -> None:
        self._ext = _load_extension()

    def new_ring(self, capacity_bytes: int = RING_CAPACITY_BYTES) -> TokenRing:
        """A C ring: the only kind :meth:`run` accepts, since C writes into it directly."""
        return cast(TokenRing, self._ext.TokenRing(capacity_bytes))

    def run(
        self,
        llama: Llama,
        ring: TokenRing,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        grammar: str | GrammarConstraint | None = None,
        *,
        cached: int = 0,
    ) -> LoopOutcome:
        """See :meth:`modeld.engine.base.TokenLoop.run`.

        Raises TypeError for a ring not made by :meth:`new_ring`, ValueError for an empty
        prompt or a ``cached`` outside ``[0, len(prompt_tokens))``, RuntimeError if another
        producer is using the ring.
        """
        outcome, _ = self._run(
            llama, ring, prompt_tokens, params, grammar, cached=cached, pause_fd=-1
        )
        return outcome

    def run_traced(
        self,
        llama: Llama,
        ring: TokenRing,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        *,
        grammar: str | GrammarConstraint | None = None,
        cached: int = 0,
        pause_in_prompt_fd: int = -1,
        grammar_paths: list[int] | None = None,
    ) -> tuple[LoopOutcome, list[int]]:
        """:meth:`run`, also returning every sampled token id (an EOG included): for tests.

        ``pause_in_prompt_fd`` (an eventfd, test hook): the first prompt decode writes to it
        and then waits inside llama.cpp's abort callback until the ring is cancelled, so a
        test can cancel exactly during prompt evaluation. ``grammar_paths``, when given,
        receives how many of a grammar's tokens the fast path chose and how many took the
        full pass (see csrc/sampling.h).
        """
        return self._run(
            llama,
            ring,
            prompt_tokens,
            params,
            grammar,
            cached=cached,
            pause_fd=pause_in_prompt_fd,
            grammar_paths=grammar_paths,
        )

    def _run(
        self,
        llama: Llama,
        ring: TokenRing,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        grammar: str | GrammarConstraint | None,
        *,
        cached: int,
        pause_fd: int,
        grammar_paths: list[int] | None = None,
    ) -> tuple[LoopOutcome, list[int]]:
        if not isinstance(ring, self._ext.TokenRing):
            raise TypeError("the C token loop needs a ring made by CTokenLoop.new_ring()")
        if params.seed is None:  # C reads every field by name, so the seed is settled here
            params = msgspec.structs.replace(params, seed=secrets.randbits(32))
        constraint = as_constraint(grammar)
        try:
            result = self._ext.run(
                ring=ring,
                ctx=_address(llama.ctx),
                vocab=_address(llama._model.vocab),
                prompt=prompt_tokens,
                n_batch=llama.n_batch,
                n_vocab=llama.n_vocab(),
                penalty_last_n=llama.last_n_tokens_size,
                params=params,
                cached=cached,
                n_swa=llama_cpp.llama_model_n_swa(llama.model),
                grammar=constraint.gbnf if constraint is not None else None,
                trigger_patterns=constraint.trigger_patterns if constraint is not None else (),
                trigger_tokens=constraint.trigger_tokens if constraint is not None else (),
                full_grammar_pass=constraint is not None and constraint.full_pass,
                pause_fd=pause_fd,
            )
        finally:
            # The KV cache no longer holds what llama-cpp-python thinks it does: make its
            # next generate() start from scratch instead of reusing a prefix.
            llama.n_tokens = 0
        stop_code, completion, prompt_ns, eval_ns, error, token_ids, kept, n_kv, paths = result
        if grammar_paths is not None:
            grammar_paths[:] = paths
        outcome = LoopOutcome(
            stop_code=StopCode(stop_code),
            prompt_tokens=len(prompt_tokens),
            completion_tokens=completion,
            prompt_eval_ms=prompt_ns / 1e6,
            eval_ms=eval_ns / 1e6,
            error=error,
            cached_tokens=kept,
            kv_tokens=_kv_tokens(prompt_tokens, token_ids, n_kv),
        )
        return outcome, token_ids


def _kv_tokens(prompt: Sequence[int], sampled: list[int], n_kv: int) -> list[int] | None:
    """The first ``n_kv`` of prompt + sampled tokens: what the loop left in the KV cache."""
    if n_kv < 0 or n_kv > len(prompt) + len(sampled):
        return None
    return [*prompt[:n_kv], *sampled[: max(0, n_kv - len(prompt))]]
