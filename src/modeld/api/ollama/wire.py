"""Ollama's request bodies and response lines, translated to and from modeld's types.

Bodies ignore fields modeld does not know (Ollama does; ollama-python always sends some,
Open WebUI more). A field modeld knows but cannot honour gets a 400 naming it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from loguru import logger

from modeld.api.sampling import LOGPROBS, SamplingNames, logprob_fields, stop_list
from modeld.api.tools import ollama_history_calls
from modeld.errors import InvalidRequest
from modeld.settings.keep_alive import KeepAlive
from modeld.types import GenerationResult, MessageToolCall

__all__ = [
    "OLLAMA_SAMPLING",
    "ChatBody",
    "EmbedBody",
    "EmbeddingsBody",
    "GenerateBody",
    "ModelBody",
    "as_request",
    "final_fields",
    "format_of",
    "logprobs_of",
    "messages_of",
    "refuse_unsupported",
    "sampling_fields",
]

T = TypeVar("T")
_NS_PER_MS = 1_000_000


class ModelBody(msgspec.Struct, frozen=True, kw_only=True):
    """``/api/show`` (``name`` is what older clients send)."""

    model: str = ""
    name: str = ""
    verbose: bool = False

    @property
    def model_name(self) -> str:
        return self.model or self.name


def _positive(value: int) -> int | None:
    return value if value > 0 else None  # -1, -2 (and 0): no limit of its own


def _seed(value: int) -> int | None:
    return value if value >= 0 else None  # a negative seed is Ollama's "random"


OLLAMA_SAMPLING = SamplingNames(
    "ollama",
    renamed={"max_tokens": "num_predict"},
    unsupported=frozenset({LOGPROBS}),
    adapt={"max_tokens": _positive, "seed": _seed, "stop": stop_list},
)
"""The ``options`` modeld maps; every other key is ignored, as Ollama ignores unknown
ones (``num_gpu``, ``mirostat``, ``use_mmap``...: they mean nothing here)."""


class GenerateBody(msgspec.Struct, frozen=True, kw_only=True):
    model: str = ""
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: KeepAlive | None = None
    images: list[str] | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: Any = None  # checked by name in modeld.api.sampling.logprob_fields
    truncate: bool = True  # a prompt too long for the context keeps its end


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One message of ``/api/chat``: an ``assistant`` turn may carry ``tool_calls``, a
    ``tool`` turn answers one (``tool_name``, or the next unanswered call)."""

    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None
    tool_name: str | None = None


class ChatBody(msgspec.Struct, frozen=True, kw_only=True):
    model: str = ""
    messages: list[Message] = []
    tools: list[Any] | None = None
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: KeepAlive | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: Any = None  # checked by name in modeld.api.sampling.logprob_fields
    truncate: bool = True  # a chat too long for the context loses its oldest turns


class EmbedBody(msgspec.Struct, frozen=True, kw_only=True):
    """``/api/embed``. ``truncate`` (default true, as in Ollama) keeps the first tokens
    of an input longer than the model's embedding batch; false makes it a 400."""

    model: str = ""
    input: str | list[str] = []
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive | None = None
    dimensions: int | None = None


class EmbeddingsBody(msgspec.Struct, frozen=True, kw_only=True):
    """The legacy ``/api/embeddings``: one ``prompt``, one ``embedding``."""

    model: str = ""
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive | None = None


_CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


def _refuse_common(name: str, think: bool | str | None) -> None:
    if think:  # true, or a level ("high"): no model here thinks apart from its answer
        raise InvalidRequest(f'"{name}" does not support thinking', field="think")


def logprobs_of(body: GenerateBody | ChatBody) -> dict[str, object]:
    """``logprobs`` / ``top_logprobs`` as the request's field (none when not asked)."""
    return logprob_fields(body.logprobs, body.top_logprobs)


def messages_of(name: str, body: ChatBody) -> list[dict[str, object]]:
    """The conversation as :class:`~modeld.types.ChatMessage` fields; images are a 400.
    Ollama's calls have no ids: they are numbered here, and a ``tool`` turn answers the
    earliest unanswered call of its ``tool_name`` (or any); one that answers none is
    refused by the scheduler's checks (``messages``)."""
    _refuse_common(name, body.think)
    messages: list[dict[str, object]] = []
    unanswered: list[MessageToolCall] = []
    made = 0  # calls so far (their ids)
    for index, message in enumerate(body.messages):
        if message.images:
            raise InvalidRequest(f'"{name}" does not support images', field="messages")
        if message.role not in _CHAT_ROLES:
            raise InvalidRequest(
                f"message {index}: role {message.role!r} is not supported "
                "(system, user, assistant and tool turns of text only)",
                field="messages",
            )
        turn: dict[str, object] = {"role": message.role, "content": message.content}
        if message.tool_calls and message.role == "assistant":
            calls = ollama_history_calls(message.tool_calls, made)
            made += len(calls)
            unanswered += calls
            turn["tool_calls"] = [msgspec.to_builtins(c) for c in calls]
        elif message.role == "tool":
            turn["tool_call_id"] = _answered(unanswered, message.tool_name)
        messages.append(turn)
    return messages


def _answered(unanswered: list[MessageToolCall], tool_name: str | None) -> str:
    """The id of the call a ``tool`` turn answers (taken off ``unanswered``)."""
    for at, call in enumerate(unanswered):
        if tool_name is None or call.function.name == tool_name:
            return unanswered.pop(at).id
    return "(none)"


def format_of(value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """Ollama's ``format`` as modeld's: ``"json"`` or a schema, enforced by a grammar
    (an empty string is none, as in Ollama; any other string is refused later)."""
    return value or None


def refuse_unsupported(name: str, body: GenerateBody) -> None:
    """400 for what modeld's models cannot do, in Ollama's own words where it has them."""
    _refuse_common(name, body.think)
    if body.images:
        raise InvalidRequest(f'"{name}" does not support images', field="images")
    if body.suffix:
        raise InvalidRequest(f'"{name}" does not support insert', field="suffix")
    if body.template:
        raise InvalidRequest("a request's own template is not supported", field="template")
    if body.context:
        raise InvalidRequest("context (deprecated in Ollama) is not supported", field="context")


def _options(raw: dict[str, Any] | None) -> msgspec.Struct:
    if not raw:
        raw = {}
    ignored = sorted(set(raw) - set(OLLAMA_SAMPLING.struct.__struct_fields__))
    if ignored:
        logger.debug("options ignored", options=ignored)
    try:
        return OLLAMA_SAMPLING.convert(raw)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"option {_option_path(str(exc))}", field="options") from None


def _option_path(message: str) -> str:
    """``Expected `float`, got `str` - at `$.temperature``` → ``"temperature": ...``."""
    text, _, where = message.partition(" - at `$.")
    option = where.split("`")[0].split("[")[0]
    return f'"{option}": {text}' if option else text


def sampling_fields(raw_options: dict[str, Any] | None) -> dict[str, object]:
    """:class:`~modeld.types.SamplingParams` fields for Ollama's ``options``; the bounds
    are checked when the request is built (see :func:`as_request`)."""
    return OLLAMA_SAMPLING.fields(_options(raw_options))


_OPTION_OF_FIELD = {**OLLAMA_SAMPLING.param_names, "messages": "messages"}


def as_request(fields: dict[str, object], kind: type[T]) -> T:
    """``kind`` built from ``fields`` with every bound checked; a violation is a 400
    naming the Ollama option (or field) it came from."""
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        text, _, where = str(exc).partition(" - at `$.")
        field = where.split("`")[0].split("[")[0]
        option = _OPTION_OF_FIELD.get(field, field)
        raise InvalidRequest(f'"{option}": {text}', field=option or None) from None


def durations(result: GenerationResult) -> dict[str, int]:
    """Ollama's counters, in integer nanoseconds, from modeld's own measurements."""
    metrics = result.metrics
    return {
        "total_duration": round(metrics.total_ms * _NS_PER_MS),
        "load_duration": round(metrics.load_ms * _NS_PER_MS),
        "prompt_eval_count": metrics.prompt_tokens,
        "prompt_eval_duration": round(metrics.prompt_eval_ms * _NS_PER_MS),
        "eval_count": metrics.completion_tokens,
        "eval_duration": round(metrics.eval_ms * _NS_PER_MS),
    }


def final_fields(result: GenerationResult) -> dict[str, object]:
    return {"done": True, "done_reason": str(result.done_reason), **durations(result)}
