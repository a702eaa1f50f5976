"""One preparation of a request, in terms of the steps an engine provides: its prompt
tokenized, or its conversation (and tools) rendered through the chat template and
tokenized, its grammar checked. ``LlamaEngine.prepare_request`` is this on itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from modeld.engine.contract import PreparedRequest, Recipe, Request
from modeld.tools.plan import plan_chat
from modeld.types import ChatMessage, ChatRequest, GrammarConstraint, Tool

__all__ = ["EngineParts", "prepare_from_parts"]


class EngineParts(Protocol):
    """The steps of a preparation an engine provides (``LlamaEngine``'s methods)."""

    def prepare(
        self, prompt: str, max_tokens: int | None = None, *, truncate: bool = False
    ) -> list[int]: ...

    def prepare_chat(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int | None,
        chat_template: str | None,
        tools: Sequence[Tool] = (),
        *,
        truncate: bool = False,
    ) -> list[int]: ...

    def chat_template_source(self, chat_template: str | None) -> str | None: ...

    def check_grammar(self, grammar: str | GrammarConstraint, field: str = "format") -> None: ...


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
        tokens = engine.prepare_chat(
            plan.messages, request.max_tokens, template, plan.tools, truncate=request.truncate
        )
    else:
        tokens = engine.prepare(request.prompt, request.max_tokens, truncate=request.truncate)
    if grammar is not None:  # refused here, before any byte is sent
        engine.check_grammar(grammar, "grammar" if request.grammar else "format")
    return PreparedRequest(tokens, request, grammar, tool_format)
