"""OpenAI request bodies as modeld's own requests (:class:`ChatRequest`,
:class:`InferRequest`): a field modeld cannot honour at the value sent (``n`` out of bounds,
``logit_bias``, images, a prompt of token ids, ...) is a 400 naming it as OpenAI names it,
never silently dropped. Bounds are modeld's own, checked by the same schema as
``/infer``; the model's configured defaults fill the fields a body does not set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from modeld.api.bodies import convert_fields, decode_json
from modeld.api.errors import UnsupportedParam
from modeld.api.openai.wire import ChatCompletionBody, Choices, CompletionBody, EmbeddingBody
from modeld.api.sampling import LOGPROBS, SamplingNames, logprob_fields, stop_list
from modeld.api.tools import openai_history_calls, tool_fields
from modeld.errors import InvalidRequest
from modeld.types import (
    MAX_CHOICES,
    SEED_MAX,
    ChatMessage,
    ChatRequest,
    EmbeddingInput,
    InferRequest,
    ResponseFormat,
)

__all__ = [
    "OPENAI_SAMPLING",
    "chat_request",
    "check_unsupported",
    "completion_request",
    "constraint_fields",
    "embedding_inputs",
    "messages_from",
    "msgspec_message",
    "response_format",
    "sampling_of",
    "with_defaults",
]

DefaultsFor = Callable[[str | None], Mapping[str, object]]


def _seed(value: int) -> int | None:
    """OpenAI takes any int; < 0: random."""
    return value % (SEED_MAX + 1) if value >= 0 else None


OPENAI_SAMPLING = SamplingNames(
    "openai", unsupported=frozenset({LOGPROBS}), adapt={"stop": stop_list, "seed": _seed}
)
"""Chat and completions take every sampling parameter by modeld's own names (``top_k``,
``min_p``, ``repeat_penalty``: the llama-server/vLLM extensions clients send in
``extra_body``)."""
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
_TOKEN_HINT = (
    "token arrays are not accepted (their ids belong to another tokenizer); send text. "
    "LangChain's OpenAIEmbeddings sends tiktoken ids unless check_embedding_ctx_length=False"
)


def _unsupported(param: str, why: str) -> InvalidRequest:
    return UnsupportedParam(f"{param}: {why}", field=param)


def check_unsupported(body: Choices) -> None:
    """The fields shared by chat and completions that modeld honours at one value only."""
    if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
        raise _unsupported("n", f"n is 1 to {MAX_CHOICES} choices")
    if body.logit_bias:
        raise _unsupported("logit_bias", "logit_bias is not supported")


def sampling_of(body: bytes, names: SamplingNames = OPENAI_SAMPLING) -> dict[str, object]:
    """The :class:`SamplingParams` fields the body sets, by modeld's names (absent ones
    are left out, so defaults fill them). A wrong type is a 400 naming the field."""
    return names.fields(decode_json(body, names.struct))


def with_defaults(
    fields: dict[str, object], model: str | None, defaults_for: DefaultsFor
) -> dict[str, object]:
    """The model's configured defaults under what the body set; without either, no
    ``max_tokens`` limit (OpenAI's default: the rest of the context)."""
    merged = {**defaults_for(model), **fields}
    merged.setdefault("max_tokens", None)
    return merged


def chat_request(
    body: ChatCompletionBody, sampling: dict[str, object], defaults_for: DefaultsFor
) -> ChatRequest:
    """Raises :class:`InvalidRequest` naming the OpenAI parameter."""
    check_unsupported(body)
    if body.functions:
        raise _unsupported("functions", "the deprecated functions: send tools")
    if body.function_call not in (None, "none", "auto"):
        raise _unsupported("function_call", "the deprecated function_call: send tool_choice")
    if body.modalities and set(body.modalities) != {"text"}:
        raise _unsupported("modalities", "only text is generated")
    for name in ("audio", "prediction", "web_search_options"):
        if getattr(body, name) is not None:
            raise _unsupported(name, f"{name} is not supported")
    fields = dict(sampling)
    fields.update(logprob_fields(body.logprobs, body.top_logprobs))
    wanted = body.max_completion_tokens
    if wanted is not None and fields.setdefault("max_tokens", wanted) != wanted:
        raise _unsupported("max_tokens", "max_tokens and max_completion_tokens differ")
    fields["messages"] = [msgspec_message(m) for m in messages_from(body.messages)]
    fields.update(tool_fields(body.tools, body.tool_choice, body.parallel_tool_calls))
    fields["model"] = body.model
    fields["stream"] = bool(body.stream)
    fields.update(constraint_fields(body))
    request = convert_fields(with_defaults(fields, body.model, defaults_for), ChatRequest)
    return request


def msgspec_message(message: ChatMessage) -> dict[str, object]:
    """A message as the plain fields :func:`convert_fields` reads back."""
    fields: dict[str, object] = msgspec.to_builtins(message)
    return fields


def messages_from(messages: list[dict[str, Any]]) -> list[ChatMessage]:
    """OpenAI messages as modeld's: ``developer`` is ``system``, text parts are joined,
    an ``assistant``'s ``tool_calls`` and a ``tool`` turn's ``tool_call_id`` kept;
    images, audio, files and the deprecated ``function`` role are refused naming the
    message."""
    if not messages:
        raise _unsupported("messages", "at least one message is needed")
    converted = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _unsupported(where, "a message is an object with role and content")
        role = message.get("role")
        if role == "function":
            raise _unsupported(f"{where}.role", "the deprecated function role: send tool")
        if role not in _ROLES:
            raise _unsupported(f"{where}.role", f"unknown role {role!r}")
        if message.get("function_call"):
            raise _unsupported(f"{where}.function_call", "send tool_calls")
        content = _content(message.get("content"), where, role)
        calls = message.get("tool_calls")
        if role == "tool":
            answers = message.get("tool_call_id")
            if not isinstance(answers, str) or not answers:
                raise _unsupported(f"{where}.tool_call_id", "a tool message needs tool_call_id")
            converted.append(ChatMessage("tool", content, tool_call_id=answers))
        elif calls and role == "assistant":
            history = openai_history_calls(calls, where)
            converted.append(ChatMessage("assistant", content, tool_calls=history))
        else:
            converted.append(ChatMessage(_ROLES[role], content))  # type: ignore[arg-type]
    return converted


def _content(content: object, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role in ("assistant", "tool"):
        return ""
    if not isinstance(content, list):
        raise _unsupported(f"{where}.content", "content is a string or a list of text parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal":
            continue
        else:
            raise _unsupported(f"{where}.content", f"{kind or 'this'} parts are not supported")
    return "\n".join(texts)


def response_format(value: dict[str, Any] | None) -> ResponseFormat | None:
    """``response_format`` as modeld's ``format``: enforced by a grammar, never ignored."""
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":  # llama-server's extension: a schema beside the type
        schema = value.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise _unsupported("response_format.schema", "a schema is an object")
        return schema or "json"
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _unsupported("response_format.json_schema", "json_schema must be an object")
        schema = spec.get("schema")
        if schema is None:
            return "json"
        if not isinstance(schema, dict):
            raise _unsupported("response_format.json_schema.schema", "a schema is an object")
        return schema
    raise _unsupported("response_format.type", f"unknown response format type {kind!r}")


def constraint_fields(body: Choices) -> dict[str, object]:
    """What constrains the answer: ``response_format``, or llama-server's own fields
    (a top-level ``json_schema``, a raw GBNF ``grammar``), as modeld's ``format`` or
    ``grammar`` (both enforced by the same bounded grammar path, never ignored). More
    than one of them is a 400 naming the later."""
    chosen = response_format(body.response_format)  # {"type": "text"} is none
    given = [name for name, value in (("response_format", chosen),
             ("json_schema", body.json_schema), ("grammar", body.grammar))
             if value is not None]  # fmt: skip
    if len(given) > 1:
        raise _unsupported(given[-1], f"give one of {', '.join(given)}, not several")
    if body.json_schema is not None:
        if not isinstance(body.json_schema, dict):
            raise _unsupported("json_schema", "a schema is an object")
        return {"format": body.json_schema}
    if body.grammar is not None:
        if not isinstance(body.grammar, str):
            raise _unsupported("grammar", "a grammar is GBNF text")
        return {"grammar": body.grammar}
    return {"format": chosen}


def completion_request(
    body: CompletionBody, sampling: dict[str, object], defaults_for: DefaultsFor
) -> InferRequest:
    """Raises :class:`InvalidRequest` naming the OpenAI parameter."""
    check_unsupported(body)
    if body.echo:
        raise _unsupported("echo", "echo is not supported")
    if body.suffix:
        raise _unsupported("suffix", "suffix (insertion) is not supported")
    if body.best_of is not None and body.best_of != 1:
        raise _unsupported("best_of", "modeld generates one choice per request (best_of=1)")
    fields = dict(sampling)
    asked = body.logprobs is not None  # a count that is its own switch
    fields.update(logprob_fields(asked, body.logprobs, top_param="logprobs"))
    fields["prompt"] = _prompt(body.prompt)
    fields["model"] = body.model
    fields["stream"] = bool(body.stream)
    fields.update(constraint_fields(body))
    return convert_fields(with_defaults(fields, body.model, defaults_for), InferRequest)


def _prompt(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise _unsupported("prompt", "one prompt per request (a list of one string at most)")
    if isinstance(prompt, list) and prompt:
        raise _unsupported("prompt", _TOKEN_HINT)
    raise _unsupported("prompt", "prompt is a string")


def _token_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(x) is int for x in value)


def embedding_inputs(body: EmbeddingBody) -> list[EmbeddingInput]:
    """``input`` as modeld's inputs: a string, a list of strings, a list of token ids
    (one input) or a list of such lists; ids are checked against the model's vocabulary
    and its batch when the model has them. Raises :class:`InvalidRequest` naming
    ``input`` or ``encoding_format``."""
    if body.encoding_format not in (None, "float", "base64"):
        raise _unsupported("encoding_format", "encoding_format is 'float' or 'base64'")
    if isinstance(body.input, str):
        return [body.input]
    if _token_ids(body.input):
        return [body.input]
    if isinstance(body.input, list) and body.input:
        if all(isinstance(x, str) for x in body.input):
            return list(body.input)
        if all(_token_ids(x) for x in body.input):
            return list(body.input)
    raise _unsupported(
        "input",
        "input is a string, a list of strings, a list of token ids or a list of such lists "
        "(non-empty)",
    )
