"""A Jinja chat template (from a GGUF's ``tokenizer.chat_template`` or an operator's
file), compiled once and rendered with the variables transformers and llama.cpp give it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from modeld.chat.sandbox import OutputTooLong, TemplateRefused, compile_template, render_bounded
from modeld.errors import ChatTemplateError, ContextLengthExceeded
from modeld.settings.per_model import template_file
from modeld.types import ChatMessage, MessageToolCall, Tool

__all__ = [
    "MAX_TEMPLATE_CHARS",
    "ChatTemplate",
    "configured_source",
    "output_too_long",
    "read_template_file",
    "template_messages",
    "template_tools",
]

# Real templates are a few KiB (tool-heavy ones ~20 KiB); compiling is linear in size.
MAX_TEMPLATE_CHARS = 128 * 1024


class ChatTemplate:
    """One compiled template. Thread-safe to render; render on a worker thread (a render
    may take up to the sandbox's deadline), never on the event loop.

    Raises :class:`ChatTemplateError` from the constructor when the source is too large
    or not a valid Jinja template (its ``where`` says which template it was).
    """

    def __init__(self, source: str, *, where: str) -> None:
        self.where = where
        self.source = source  # what modeld.tools.detect_format reads
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(
                f"{where}: the chat template is {len(source)} characters; at most "
                f"{MAX_TEMPLATE_CHARS} are accepted"
            )
        try:
            self._template = compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"{where}: the chat template is not valid Jinja (line {exc.lineno}: {exc.message})"
            ) from None
        except RecursionError:
            raise ChatTemplateError(f"{where}: the chat template is nested too deeply") from None
        except TemplateRefused as exc:  # its compile ran past the sandbox's bounds
            raise ChatTemplateError(f"{where}: {exc}") from None

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        bos_token: str,
        eos_token: str,
        max_chars: int,
        add_generation_prompt: bool = True,
        tools: Sequence[Tool] = (),
    ) -> str:
        """The prompt text for ``messages``, ending with the assistant's turn opened.

        ``tools`` and the messages' ``tool_calls``/``tool_call_id`` reach the template as
        Hugging Face's renderer passes them (:func:`template_messages`,
        :func:`template_tools`); ``tools`` is None for a template when there are none.

        Raises :class:`ChatTemplateError` with the template's own message when it refuses
        the conversation (``raise_exception``: an unsupported role, turns out of order),
        or saying why the sandbox stopped it.
        """
        variables = {
            "messages": template_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "tools": template_tools(tools) or None,
            "documents": None,
        }
        try:
            return render_bounded(lambda: self._template.generate(variables), max_chars=max_chars)
        except OutputTooLong as exc:
            raise output_too_long(messages, max_chars, f"{self.where}: {exc}") from None
        except TemplateRefused as exc:
            raise ChatTemplateError(f"{self.where}: {exc}") from None


def output_too_long(
    messages: Sequence[ChatMessage], max_chars: int, message: str
) -> ChatTemplateError | ContextLengthExceeded:
    """A rendering over ``max_chars``: the conversation is too long for the context
    (:class:`ContextLengthExceeded`) when its own text is most of that, else the
    template blew it up (:class:`ChatTemplateError`)."""
    if 2 * sum(len(m.content) for m in messages) > max_chars:
        return ContextLengthExceeded(message, field="messages")
    return ChatTemplateError(message)


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as transformers' ``apply_chat_template`` hands them to a template: role
    and content, an assistant's ``tool_calls`` (``id``, ``type``, ``function.name``, and
    ``function.arguments`` as an object, which the common templates run through
    ``tojson``; text that is not a JSON object stays text), a tool's ``tool_call_id``."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [_template_call(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        rendered.append(item)
    return rendered


def template_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """Tools as JSON-schema dicts in OpenAI's shape, as transformers passes them."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool.function.name,
                "description": tool.function.description,
                "parameters": tool.function.parameters,
            },
        }
        for tool in tools
    ]


def _template_call(call: MessageToolCall) -> dict[str, Any]:
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    if not isinstance(arguments, dict):
        arguments = call.function.arguments
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }


def read_template_file(path: Path) -> str:
    """A Jinja file's text, read on each request (an edited file is used at once)."""
    if not os.path.isfile(path):  # before opening: a FIFO would block the open
        raise ChatTemplateError(f"chat template {path} is not a readable regular file")
    try:
        with path.open("rb") as handle:
            data = handle.read(4 * MAX_TEMPLATE_CHARS + 1)
    except OSError as exc:
        raise ChatTemplateError(f"cannot read chat template {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ChatTemplateError(f"chat template {path} is not UTF-8") from None


def configured_source(chat_template: str) -> str | None:
    """The Jinja source a configured ``chat_template`` renders with: its file's text, or
    None for a llama.cpp built-in name. Raises :class:`ChatTemplateError` as
    :func:`read_template_file` does."""
    path = template_file(chat_template)
    return read_template_file(path) if path is not None else None
