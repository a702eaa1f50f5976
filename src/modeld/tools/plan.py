"""What a chat request's tools make of its preparation: the checks made before anything
is held (:func:`check_tool_request`), and on the model's worker, once the chat template
in use is known, the format, the messages and tools the template renders, and the
grammar (:func:`plan_tools`). The one place ``tool_choice`` is turned into enforcement,
for every protocol and the library alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from modeld.errors import InvalidRequest
from modeld.tools.definitions import check_tool_messages, check_tools, chosen_tools
from modeld.tools.formats import ToolFormat, forced_grammar, lazy_grammar, resolve_format
from modeld.tools.prompt import generic_messages
from modeld.tools.schema import arguments_grammar
from modeld.types import ChatMessage, ChatRequest, GrammarConstraint, NamedToolChoice, Tool

__all__ = [
    "ToolPlan",
    "check_tool_request",
    "plan_chat",
    "plan_tools",
    "tools_active",
    "touches_tools",
]


class _Configured(Protocol):
    @property
    def tool_format(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request is rendered and constrained. ``format`` is None when the answer
    is not parsed for calls (no tools, or ``tool_choice: "none"``)."""

    format: ToolFormat | None
    messages: tuple[ChatMessage, ...]
    tools: tuple[Tool, ...]  # handed to the chat template
    grammar: GrammarConstraint | None


def tools_active(request: ChatRequest) -> bool:
    """Whether the model may call a tool: tools given and ``tool_choice`` not ``none``."""
    return bool(request.tools) and request.tool_choice != "none"


def touches_tools(request: ChatRequest) -> bool:
    """Whether tools change how ``request`` is prepared (tools, or calls in its history)."""
    return bool(request.tools) or any(m.tool_calls or m.role == "tool" for m in request.messages)


def check_tool_request(request: ChatRequest) -> None:
    """Refuse, before any model is touched, what no model could honour: the checks of
    :func:`check_tools` and :func:`check_tool_messages`, a parameter schema the grammar
    converter refuses (the same bounds as structured output), and ``format`` together
    with active tools (one grammar per answer). Raises :class:`InvalidRequest` naming
    ``tools``, ``tool_choice``, ``messages`` or ``format``. Pure Python."""
    check_tools(request.tools, request.tool_choice)
    check_tool_messages(request.messages)
    if not tools_active(request):
        return
    if request.format is not None:
        raise InvalidRequest(
            "format (structured output) cannot be combined with tools; "
            'send tool_choice "none" or no format',
            field="format",
        )
    arguments_grammar({t.function.name: t.function.parameters for t in request.tools})


def plan_tools(request: ChatRequest, template_source: str | None, override: str | None) -> ToolPlan:
    """On the worker: the format of the template in use (or the model's ``tool_format``),
    the conversation as that template takes it (the ``generic`` format describes the
    tools in the system message), and the grammar: ``required`` or a named function
    force a call, ``auto`` (or no choice) a lazy grammar set off by the format's
    opening, ``none`` nothing (and no tools in the prompt)."""
    fmt = resolve_format(template_source, override)
    active = tools_active(request)
    offered = chosen_tools(request.tools, request.tool_choice) if active else ()
    grammar = None
    if active:
        forced = request.tool_choice == "required" or isinstance(
            request.tool_choice, NamedToolChoice
        )
        make = forced_grammar if forced else lazy_grammar
        grammar = make(fmt, offered, parallel=request.parallel_tool_calls)
    if fmt is ToolFormat.GENERIC:
        messages = generic_messages(request.messages, offered, request.tool_choice)
        return ToolPlan(fmt if active else None, messages, (), grammar)
    return ToolPlan(fmt if active else None, request.messages, offered, grammar)


def plan_chat(
    request: ChatRequest, template_source: Callable[[], str | None], model: _Configured
) -> ToolPlan:
    """:func:`plan_tools` for a request whose tools (or history calls) need it; else the
    messages as they are (the template's source is not even looked up)."""
    if not touches_tools(request):
        return ToolPlan(None, request.messages, (), None)
    return plan_tools(request, template_source(), model.tool_format)
