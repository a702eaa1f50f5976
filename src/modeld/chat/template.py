"""A Jinja chat template (from a GGUF's ``tokenizer.chat_template`` or an operator's
file), compiled once and rendered with the variables transformers and llama.cpp give it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2

from modeld.chat.sandbox import OutputTooLong, TemplateRefused, compile_template, render_bounded
from modeld.errors import ChatTemplateError, ContextLengthExceeded
from modeld.types import ChatMessage

__all__ = ["MAX_TEMPLATE_CHARS", "ChatTemplate", "output_too_long"]

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
    ) -> str:
        """The prompt text for ``messages``, ending with the assistant's turn opened.

        Raises :class:`ChatTemplateError` with the template's own message when it refuses
        the conversation (``raise_exception``: an unsupported role, turns out of order),
        or saying why the sandbox stopped it.
        """
        variables = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "tools": None,
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
