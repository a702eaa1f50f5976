"""What the scheduler needs of an engine, and the one hand-over of a request to it.

The scheduler hands a request to the model's worker once: :func:`run_request` prepares
it there (the prompt tokenized, or the conversation rendered through the chat template
and tokenized; both checked against the context; a grammar checked against the
vocabulary), says so, and generates from what it prepared. The prepared tokens never
leave the worker, and nothing above ``engine/`` looks at the request's kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from modeld.engine.base import RING_CAPACITY_BYTES, LoopOutcome, StopCode, TokenRing
from modeld.tools.plan import plan_chat
from modeld.types import (
    ChatMessage,
    ChatRequest,
    ContextSizes,
    GrammarConstraint,
    InferRequest,
    SamplingParams,
    Tool,
)

__all__ = [
    "Engine",
    "EngineParts",
    "PreparedRequest",
    "Recipe",
    "Request",
    "prepare_from_parts",
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
        self, texts: Sequence[str], cancelled: Callable[[], bool]
    ) -> tuple[list[list[float]], int]: ...

    def warm_up(self) -> None: ...

    def close(self) -> None: ...


class EngineParts(Protocol):
    """The steps of a preparation an engine provides (``LlamaEngine``'s methods)."""

    def prepare(self, prompt: str, max_tokens: int | None) -> list[int]: ...

    def prepare_chat(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int | None,
        chat_template: str | None,
        tools: Sequence[Tool] = (),
    ) -> list[int]: ...

    def chat_template_source(self, chat_template: str | None) -> str | None: ...

    def check_grammar(self, grammar: str | GrammarConstraint) -> None: ...


def prepare_from_parts(engine: EngineParts, request: Request, recipe: Recipe) -> PreparedRequest:
    """The request's tokens (its prompt, or its messages and tools through ``recipe``'s
    chat template and :func:`modeld.tools.plan_chat`: the template's tool-call format and
    the grammar that enforces it), checked, and its grammar checked against the
    vocabulary. Raises what the parts raise (``InvalidRequest`` naming the field,
    ``NoChatTemplate``, ``ChatTemplateError``)."""
    grammar, tool_format, template = recipe.grammar, None, recipe.chat_template
    if isinstance(request, ChatRequest):
        plan = plan_chat(request, lambda: engine.chat_template_source(template), recipe)
        grammar, tool_format = plan.grammar or grammar, plan.format
        tokens = engine.prepare_chat(plan.messages, request.max_tokens, template, plan.tools)
    else:
        tokens = engine.prepare(request.prompt, request.max_tokens)
    if grammar is not None:
        engine.check_grammar(grammar)  # refused here, before any byte is sent
    return PreparedRequest(tokens, request, grammar, tool_format)


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
