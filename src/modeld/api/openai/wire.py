"""The OpenAI request bodies modeld reads, as the ``openai`` client (3.51) sends them.

Unknown fields are ignored (the real API's clients keep adding them: ``store``,
``metadata``, ``service_tier``, ...); JSON ``null`` is the same as absent. A field's type
is checked here (a 400 naming it); what modeld can honour is decided in
:mod:`modeld.api.openai.translate`.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "ChatCompletionBody",
    "Choices",
    "CompletionBody",
    "EmbeddingBody",
    "ResponseBody",
    "StreamOptions",
]


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None


class Choices(msgspec.Struct, kw_only=True):
    """What chat and completions share besides the sampling parameters (those are read
    by :data:`modeld.api.openai.translate.OPENAI_SAMPLING`, derived from
    :class:`~modeld.types.SamplingParams`): the fields modeld can only honour at one
    value."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None  # a grammar, on chat and completions
    json_schema: dict[str, Any] | None = None  # llama-server's: a schema, enforced
    grammar: Any = None  # llama-server's: GBNF of the client's own, bounded


class ChatCompletionBody(Choices, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: Any = None  # checked by name in modeld.api.sampling.logprob_fields
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None


class CompletionBody(Choices, kw_only=True):
    prompt: Any = None  # a string, or a list of one; token arrays are refused by name
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: Any = None  # a count, checked by name in modeld.api.sampling.logprob_fields


class EmbeddingBody(msgspec.Struct, kw_only=True):
    input: Any = None  # a string, strings, token ids, or lists of token ids
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None


class ResponseBody(msgspec.Struct, kw_only=True):
    """``POST /v1/responses``, text only: ``input`` (a string or a list of messages),
    ``instructions`` (a system message), no tools, no stored state. Its sampling
    parameters are read by :data:`modeld.api.openai.responses.RESPONSES_SAMPLING`."""

    input: Any = None
    model: str | None = None
    instructions: str | None = None
    stream: bool | None = None
    text: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    previous_response_id: str | None = None
    store: bool | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None  # "message.output_text.logprobs": the text's logprobs
    top_logprobs: Any = None  # checked by name in modeld.api.sampling.logprob_fields
