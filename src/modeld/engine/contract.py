"""What the scheduler needs of an engine, and the one hand-over of a request to it.

The scheduler hands a request to the model's worker once: :func:`run_request` prepares
it there (the prompt tokenized, or the conversation rendered through the chat template
and tokenized; both checked against the context; a grammar checked against the
vocabulary), says so, and generates from what it prepared. The prepared tokens never
leave the worker, and nothing above ``engine/`` looks at the request's kind.

Several answers to one request (OpenAI's ``n``) are that one hand-over, then
:func:`run_choice` for each further choice, from what the first prepared: the same
tokens, so the context's KV from the choice before keeps all of the prompt but its last
token (prompt reuse), and the seed plus the choice's index (:func:`choice_seed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import msgspec

from modeld.engine.base import RING_CAPACITY_BYTES, LoopOutcome, StopCode, TokenRing
from modeld.types import (
    SEED_MAX,
    ChatRequest,
    ContextSizes,
    EmbeddingInput,
    GrammarConstraint,
    InferRequest,
    SamplingParams,
)

if TYPE_CHECKING:
    from modeld.engine.cache_tier import CacheTier
    from modeld.engine.context_threads import ContextThreads
    from modeld.prompt_cache.cache import ModelPromptCache

__all__ = [
    "Engine",
    "PreparedRequest",
    "Recipe",
    "Request",
    "choice_seed",
    "run_choice",
    "run_request",
]

Request = InferRequest | ChatRequest


@dataclass(frozen=True, slots=True)
class Recipe:
    """What the scheduler settled for a request before it reached the worker: the
    grammar its ``format`` converts to, the model's configured chat template and
    tool-call format (None: the template's own, see :func:`modeld.tools.plan_tools`)."""

    grammar: str | GrammarConstraint | None = None
    chat_template: str | None = None
    tool_format: str | None = None


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request made ready to generate on one engine; it stays on that engine's
    worker thread."""

    tokens: list[int]
    params: SamplingParams
    grammar: str | GrammarConstraint | None
    tool_format: str | None = None  # the answer is parsed for calls in this format


class Engine(Protocol):
    """One loaded model and its context, used only from the thread that made it.

    Every method but :meth:`new_ring` raises ``NotOwnerThread`` from another thread,
    and ``EngineClosed`` after :meth:`close`.
    """

    label: str
    sizes: ContextSizes
    model_size_bytes: int  # llama.cpp's own count of the weights
    threads: ContextThreads  # what the thread budget's leases set

    def new_ring(self, capacity_bytes: int = RING_CAPACITY_BYTES) -> TokenRing: ...

    def prepare_request(self, request: Request, recipe: Recipe) -> PreparedRequest:
        """Tokenize and check; raises ``InvalidRequest`` (naming the field),
        ``NoChatTemplate``, ``ChatTemplateError``."""
        ...

    def generate(
        self,
        ring: TokenRing,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        grammar: str | GrammarConstraint | None = None,
    ) -> LoopOutcome:
        """Run the token loop into ``ring`` and finish it; failures come back as
        ``StopCode.ERROR``."""
        ...

    def embed(
        self,
        inputs: Sequence[EmbeddingInput],
        cancelled: Callable[[], bool],
        *,
        truncate: bool = False,
    ) -> tuple[list[list[float]], int]: ...

    def warm_up(self) -> None: ...

    def attach_prompt_cache(self, cache: ModelPromptCache | None) -> None:
        """The second tier behind the context's KV (None: none)."""
        ...

    @property
    def cache_tier(self) -> CacheTier:
        """That tier's engine side: what an idle model keeps (:meth:`CacheTier.keep_idle`)."""
        ...

    def close(self) -> None:
        """Frees the model now (a prompt cache gets the context's prefix first)."""
        ...


def run_request(
    engine: Engine,
    request: Request,
    recipe: Recipe,
    ring: TokenRing,
    prepared: Callable[[], None],
    keep: Callable[[PreparedRequest], None] | None = None,
) -> LoopOutcome:
    """On the worker: prepare ``request``, hand it to ``keep`` (what the event loop
    needs of it, e.g. its tool-call format), call ``prepared()``, then generate into
    ``ring``.

    A preparation that raises ends here (nothing generated; the ring is left to its
    owner). A ring cancelled while the request was being prepared (its client left)
    ends as ``StopCode.CANCELLED`` before anything is evaluated.
    """
    work = engine.prepare_request(request, recipe)
    if keep is not None:
        keep(work)
    prepared()
    if ring.cancelled:
        ring.finish()
        return LoopOutcome(StopCode.CANCELLED, len(work.tokens), 0, 0.0, 0.0)
    return engine.generate(ring, work.tokens, work.params, work.grammar)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a request seeded ``seed``: ``seed + index``
    (wrapping past :data:`~modeld.types.SEED_MAX`), so a seeded request gives the same
    choices again and no two of them alike; unseeded, each choice draws its own."""
    return None if seed is None else (seed + index) % (SEED_MAX + 1)


def run_choice(engine: Engine, work: PreparedRequest, index: int, ring: TokenRing) -> LoopOutcome:
    """On the worker: choice ``index`` (>= 1) of a request :func:`run_request` prepared as
    ``work``, into ``ring``, without preparing it again. Run right after the choice
    before on the same context, its prompt's KV is reused but for the last token."""
    if ring.cancelled:
        ring.finish()
        return LoopOutcome(StopCode.CANCELLED, len(work.tokens), 0, 0.0, 0.0)
    params = msgspec.structs.replace(work.params, seed=choice_seed(work.params.seed, index))
    return engine.generate(ring, work.tokens, params, work.grammar)
