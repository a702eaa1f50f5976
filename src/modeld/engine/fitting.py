"""A request's prompt tokens, checked against the context (:class:`PromptTokens`), or
fitted into it by dropping what Ollama drops: for a conversation, the oldest turns (its
system messages and its latest message always stay); for a raw prompt, its beginning
(:meth:`~modeld.engine.tokens.Tokenizer.tokenize_end`).

Only requests that ask for it (``truncate``: Ollama's ``/api/*``) are fitted; others get
:class:`~modeld.errors.ContextLengthExceeded` as OpenAI answers. What is kept leaves room
to generate: :func:`prompt_budget`. Used on the model's worker thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from modeld.engine.chat_format import ChatFormatter
from modeld.engine.tokens import Tokenizer
from modeld.errors import ContextLengthExceeded
from modeld.types import ChatMessage, Tool

__all__ = ["PromptTokens", "fit_messages", "prompt_budget"]


def prompt_budget(n_ctx: int, max_tokens: int | None) -> int:
    """The tokens a truncated prompt may keep: the context less room for ``max_tokens``
    (at most half the context, so a large ``num_predict`` cannot leave no prompt)."""
    reserve = n_ctx // 2 if max_tokens is None else min(max_tokens, n_ctx // 2)
    return max(1, n_ctx - reserve)


def _kept(messages: Sequence[ChatMessage], start: int) -> list[ChatMessage]:
    """The system messages before ``start``, then every message from ``start`` on."""
    return [m for m in messages[:start] if m.role == "system"] + list(messages[start:])


def fit_messages(
    tokens_of: Callable[[Sequence[ChatMessage]], list[int]],
    messages: Sequence[ChatMessage],
    budget_tokens: int,
) -> list[int]:
    """The tokens of the most recent messages whose rendering fits ``budget_tokens``,
    with every system message kept, as Ollama truncates a chat. ``tokens_of`` renders
    and tokenizes (raising :class:`ContextLengthExceeded` when even that overflows).

    The oldest turn kept is found by bisection: O(log n) renders, not one per message.
    Raises :class:`ContextLengthExceeded` (field ``messages``) when the system messages
    and the latest message alone do not fit.
    """

    def fits(start: int) -> list[int] | None:
        try:
            tokens = tokens_of(_kept(messages, start))
        except ContextLengthExceeded:
            return None
        return tokens if len(tokens) <= budget_tokens else None

    whole = fits(0)
    if whole is not None:
        return whole
    last = len(messages) - 1
    best = fits(last)
    if best is None:
        raise ContextLengthExceeded(
            f"the system messages and the latest message alone do not fit the "
            f"{budget_tokens} tokens the context leaves for a prompt",
            field="messages",
        )
    low, high = 1, last  # fits(0) failed, fits(last) did
    while low < high:
        middle = (low + high) // 2
        tokens = fits(middle)
        if tokens is None:
            low = middle + 1
        else:
            high, best = middle, tokens
    return best


class PromptTokens:
    """The prompt tokens of a model's requests: a raw prompt, or a conversation rendered
    through its chat template."""

    def __init__(self, tokenizer: Tokenizer, chat: ChatFormatter) -> None:
        self._tokenizer = tokenizer
        self._chat = chat

    def of_prompt(self, prompt: str, max_tokens: int | None, truncate: bool) -> list[int]:
        """The prompt's tokens, checked against the context; with ``truncate``, its last
        tokens that leave ``max_tokens`` of room (:func:`prompt_budget`) instead."""
        tokenizer = self._tokenizer
        if truncate:
            tokens = tokenizer.tokenize_end(prompt, prompt_budget(tokenizer.n_ctx, max_tokens))
        else:
            tokens = tokenizer.tokenize(prompt)
        tokenizer.check_room(tokens, "prompt")
        return tokens

    def of_chat(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int | None,
        chat_template: str | None,
        truncate: bool,
        tools: Sequence[Tool] = (),
    ) -> list[int]:
        """The conversation rendered and tokenized, with control tokens parsed and no
        second BOS when the template wrote one; with ``truncate``, its most recent turns
        that fit (:func:`fit_messages`)."""
        tokenizer, chat = self._tokenizer, self._chat

        def tokens_of(kept: Sequence[ChatMessage]) -> list[int]:
            limit = tokenizer.max_prompt_bytes
            text = chat.render(kept, chat_template, max_chars=limit, tools=tools)
            bos = chat.bos_token
            add_bos = tokenizer.add_bos and not (bos and text.startswith(bos))
            return tokenizer.tokenize(text, add_bos=add_bos, field="messages")

        if truncate:
            budget = prompt_budget(tokenizer.n_ctx, max_tokens)
            tokens = fit_messages(tokens_of, messages, budget)
        else:
            tokens = tokens_of(messages)
        tokenizer.check_room(tokens, "messages")
        return tokens
