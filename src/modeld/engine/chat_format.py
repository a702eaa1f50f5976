"""Which chat template a model uses, and rendering a conversation with it.

In order: the operator's override for the model (a llama.cpp built-in template name,
rendered by ``llama_chat_apply_template``, or a Jinja file), else the GGUF's own
``tokenizer.chat_template`` (rendered only in :mod:`modeld.chat`'s sandbox), else none:
:class:`NoChatTemplate`, never a silent guess (llama-cpp-python's own fallback is the
llama-2 format, wrong for most models).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import cache

import llama_cpp

from modeld.chat import ChatTemplate
from modeld.chat.template import configured_source, output_too_long, read_template_file
from modeld.errors import ChatTemplateError, NoChatTemplate
from modeld.settings.per_model import template_file
from modeld.types import ChatMessage, Tool

__all__ = ["ChatFormatter", "builtin_chat_templates", "render_builtin"]

_GGUF_KEY = "tokenizer.chat_template"
_COMPILED_KEPT = 4  # templates a model keeps compiled (its own, and an override or two)


@cache
def builtin_chat_templates() -> frozenset[str]:
    """The template names this llama.cpp renders itself (``gemma``, ``chatml``, ...)."""
    count = llama_cpp.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * count)()
    llama_cpp.llama_chat_builtin_templates(names, count)
    return frozenset(name.decode() for name in names if name)


def render_builtin(name: str, messages: Sequence[ChatMessage], max_chars: int) -> str:
    """``messages`` in llama.cpp's built-in template ``name``, the assistant's turn opened.

    Raises :class:`ChatTemplateError` for an unknown name, and for an output over
    ``max_chars`` that :func:`output_too_long` says.
    """
    if name not in builtin_chat_templates():
        raise ChatTemplateError(f"{name!r} is not a llama.cpp built-in chat template")
    encoded = [(m.role.encode(), m.content.encode("utf-8", "replace")) for m in messages]
    chat = (llama_cpp.llama_chat_message * max(1, len(encoded)))()
    for slot, (role, content) in zip(chat, encoded, strict=False):
        slot.role, slot.content = role, content
    size = sum(len(role) + len(content) for role, content in encoded) * 2 + 1024
    for _ in range(2):  # the first answer says how much room the text needs
        buffer = ctypes.create_string_buffer(size)
        needed = llama_cpp.llama_chat_apply_template(
            name.encode(), chat, len(encoded), True, buffer, size
        )
        if needed < 0:
            raise ChatTemplateError(f"llama.cpp's {name!r} template refused this conversation")
        if needed > max_chars:
            raise output_too_long(
                messages, max_chars, f"the rendered chat is over {max_chars} characters"
            )
        if needed <= size:
            return buffer.raw[:needed].decode("utf-8", "replace")
        size = needed + 1
    raise ChatTemplateError(f"llama.cpp's {name!r} template kept growing its output")


class ChatFormatter:
    """One model's chat rendering, used on its worker thread only."""

    def __init__(self, metadata: dict[str, str], *, bos_token: str, eos_token: str) -> None:
        self._gguf_source = metadata.get(_GGUF_KEY)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled: dict[str, ChatTemplate] = {}

    @property
    def has_own_template(self) -> bool:
        return self._gguf_source is not None

    def template_source(self, override: str | None) -> str | None:
        """The Jinja source :meth:`render` would use with ``override`` (None for a
        llama.cpp built-in template or none at all): what the tool-call format is
        detected from (:func:`modeld.tools.detect_format`)."""
        if override is not None:
            return configured_source(override)
        return self._gguf_source

    def render(
        self,
        messages: Sequence[ChatMessage],
        override: str | None,
        *,
        max_chars: int,
        tools: Sequence[Tool] = (),
    ) -> str:
        """The prompt text for ``messages`` (``tools`` go to a Jinja template; a
        llama.cpp built-in template takes none: describe them in a system message, see
        :func:`modeld.tools.generic_messages`).

        Raises :class:`NoChatTemplate` when the model has no template and ``override`` is
        None, :class:`ChatTemplateError` when the template refuses the conversation or
        cannot be read or compiled.
        """
        if override is not None and template_file(override) is None:
            return render_builtin(override, messages, max_chars)
        if override is not None:
            path = template_file(override)
            assert path is not None
            source, where = read_template_file(path), str(path)
        elif self._gguf_source is not None:
            source, where = self._gguf_source, "the model's chat template"
        else:
            raise NoChatTemplate(
                "this model has no chat template; set chat_template for it in the config "
                "(a llama.cpp built-in name such as 'chatml', or a Jinja file), or use "
                "completions"
            )
        template = self._compile(source, where)
        return template.render(
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            max_chars=max_chars,
            tools=tools,
        )

    def _compile(self, source: str, where: str) -> ChatTemplate:
        template = self._compiled.get(source)
        if template is None:
            template = ChatTemplate(source, where=where)
            if len(self._compiled) >= _COMPILED_KEPT:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[source] = template
        return template
