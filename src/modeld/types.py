"""Value types shared by every layer: enums whose values are their wire strings, and the
msgspec structs that are the single source of truth for request bounds."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from modeld.logprob_entry import TokenLogprob, TopLogprob
from modeld.settings.keep_alive import KeepAlive
from modeld.sizes import MAX_CONTEXT_TOKENS

__all__ = [
    "MAX_CHAT_MESSAGES",
    "MAX_CHOICES",
    "MAX_EMBEDDING_INPUTS",
    "MAX_LOGPROB_VALUES",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_TOOLS",
    "MAX_TOP_LOGPROBS",
    "MIN_CONTEXT_TOKENS",
    "ChatMessage",
    "ChatRequest",
    "Chunk",
    "ContextSizes",
    "DoneReason",
    "EmbeddingInput",
    "EmbeddingResult",
    "FunctionCall",
    "GenerationMetrics",
    "GenerationResult",
    "GrammarConstraint",
    "InferRequest",
    "InstanceState",
    "LoopKind",
    "MessageToolCall",
    "NamedFunction",
    "NamedToolChoice",
    "ResponseFormat",
    "SamplingParams",
    "TokenLogprob",
    "Tool",
    "ToolCallDelta",
    "ToolChoice",
    "ToolFunction",
    "TopLogprob",
    "as_constraint",
    "context_sizes",
    "embedding_context_sizes",
]

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs; csrc/logprobs.h LP_MAX_TOP
MAX_STOP_STRING_CHARS = 256
MAX_PROMPT_CHARS = 1_000_000
MAX_TOKENS_CAP = MAX_CONTEXT_TOKENS
SEED_MAX = 2**32 - 1
MIN_CONTEXT_TOKENS = 16
MAX_CHAT_MESSAGES = 4096
MAX_RAW_GRAMMAR_CHARS = 256 * 1024  # a first bound; modeld.grammar's bytes bound is exact
MAX_EMBEDDING_INPUTS = 2048
MAX_CHOICES = 8  # answers to one request (OpenAI's n): each is a generation on the held slot
# log probabilities one request may report: tokens x choices x (1 + alternatives), where
# tokens is max_tokens, or the context when unset (modeld.scheduling.choices checks it)
MAX_LOGPROB_VALUES = 1 << 20


class DoneReason(enum.StrEnum):
    """Why a stream ended; the value is what the terminal line says."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    EVICTED = "evicted"
    TIMEOUT = "timeout"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    IDLE = "idle"  # unloaded when its keep-alive ran out (never while a stream runs)


class InstanceState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    UNLOADING = "unloading"


class LoopKind(enum.StrEnum):
    """Which token loop drives generations: the C extension or its pure-Python twin."""

    C = "c"
    PYTHON = "python"


@dataclass(frozen=True, slots=True)
class ContextSizes:
    """The sizes a llama context is created with, in tokens."""

    n_ctx: int
    n_batch: int
    n_ubatch: int


def context_sizes(n_ctx: int, n_batch: int, n_ctx_train: int | None = None) -> ContextSizes:
    """The one rule for a context's sizes, used by the engine that creates the context and
    by the memory estimate that budgets it (if they differed, the budget would be wrong).

    ``n_ctx`` is bounded by the model's trained length and never 0 ("auto"): metadata must
    not size an allocation. A batch never exceeds the context, and the micro-batch is the
    whole batch.
    """
    if n_ctx_train is not None:
        n_ctx = min(n_ctx, n_ctx_train)
    n_ctx = max(MIN_CONTEXT_TOKENS, n_ctx)
    n_batch = min(n_batch, n_ctx)
    return ContextSizes(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch)


def embedding_context_sizes(generation: ContextSizes) -> ContextSizes:
    """The sizes of a model's embedding context, from its generation context's: one batch.

    A pooled embedding needs a whole input in one micro-batch (llama.cpp aborts the
    process otherwise), and llama.cpp computes every token's logits there, so the
    embedding context is as small as that allows: an input holds at most ``n_batch``
    tokens.
    """
    return context_sizes(generation.n_batch, generation.n_batch)


ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
StopString = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
# What the answer must be: "json" (any JSON object) or a JSON schema (a JSON object).
# Enforced during sampling by a grammar, never merely asked for in the prompt.
ResponseFormat = Literal["json"] | dict[str, Any]
RawGrammar = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_RAW_GRAMMAR_CHARS)]
EmbeddingInput = str | Sequence[int]
"""One input to embed: a text, or the model's own token ids."""


class SamplingParams(msgspec.Struct, frozen=True):
    """How to sample: the one list of sampling parameters, with their bounds and defaults.

    Every layer reads these by name: the HTTP body (:class:`InferRequest` extends it),
    both token loops, the C loop's reader. A new parameter is one field here plus its
    reader in C. Bounds are checked when a body is decoded; constructing one directly
    trusts the caller.

    ``max_tokens=None`` means "until the context is full" (what the OpenAI and Ollama
    APIs do without a limit); the engine settles it before a loop runs.
    """

    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_CAP)] | None = 128
    temperature: Temperature = 0.8
    top_p: Probability = 0.95
    top_k: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 40
    min_p: Probability = 0.05
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 1.0
    stop: Annotated[tuple[StopString, ...], msgspec.Meta(max_length=MAX_STOP_STRINGS)] = ()
    seed: Annotated[int, msgspec.Meta(ge=0, le=SEED_MAX)] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # None: no log probabilities (no cost); n: each generated token's and its n likeliest
    # alternatives' (modeld.engine.logprobs says which distribution)
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stop, tuple):  # a list from a library caller
            msgspec.structs.force_setattr(self, "stop", tuple(self.stop))


class GrammarConstraint(msgspec.Struct, frozen=True, kw_only=True):
    """A grammar for the token loops (both read it by field name).

    ``gbnf`` has a ``root`` rule. Without triggers it holds every token; with trigger
    patterns (regexes matched against the whole output so far, e.g.
    ``^[\\s\\S]*?(<tool_call>)[\\s\\S]*$``; the grammar is fed the text from the first
    group on) or trigger tokens it is *lazy*: free text stays free until a trigger, then
    the grammar holds the rest (llama.cpp's ``llama_sampler_init_grammar_lazy_patterns``).
    Trigger patterns are compiled by ``std::regex`` in llama.cpp, where a malformed one
    aborts the process: only modeld's own code makes them (modeld.tools), never a client.
    ``full_pass`` forces the grammar onto every candidate at every step, the reference the
    fast path (docs/c-extension.md) is tested against; output is the same either way.
    """

    gbnf: str
    trigger_patterns: tuple[str, ...] = ()
    trigger_tokens: tuple[int, ...] = ()
    full_pass: bool = False

    @property
    def lazy(self) -> bool:
        return bool(self.trigger_patterns or self.trigger_tokens)


def as_constraint(grammar: str | GrammarConstraint | None) -> GrammarConstraint | None:
    """A loop's ``grammar`` argument as a :class:`GrammarConstraint` (plain GBNF text is
    one without triggers)."""
    if grammar is None or isinstance(grammar, GrammarConstraint):
        return grammar
    return GrammarConstraint(gbnf=grammar)


class InferRequest(SamplingParams, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The body of ``POST /infer`` and the arguments of ``ModelManager.generate``: what to
    generate from, and how (it *is* the request's :class:`SamplingParams`)."""

    prompt: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
    model: ModelId | None = None
    stream: bool = True
    keep_alive: KeepAlive | None = None  # how long the model stays loaded after this
    format: ResponseFormat | None = None
    grammar: RawGrammar | None = None  # GBNF of the client's own (llama-server's field)
    truncate: bool = False  # a prompt too long for the context keeps its end (Ollama's way)


# ---- tools (checked and turned into grammars by modeld.tools; defined here, the leaf)
MAX_TOOLS = 128
MAX_TOOL_DESCRIPTION_CHARS = 8192
MAX_TOOL_CALL_ID_CHARS = 256
ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class ToolFunction(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A function the model may call; ``parameters`` is a JSON schema for its arguments
    (an object schema; absent means none)."""

    name: ToolName
    description: Annotated[str, msgspec.Meta(max_length=MAX_TOOL_DESCRIPTION_CHARS)] = ""
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    strict: bool | None = None  # OpenAI's flag; arguments are always enforced here


class Tool(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: ToolFunction


class NamedFunction(msgspec.Struct, frozen=True):
    name: ToolName


class NamedToolChoice(msgspec.Struct, frozen=True):
    """``{"type": "function", "function": {"name": ...}}``: that function must be called."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(msgspec.Struct, frozen=True):
    name: ToolName
    arguments: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]  # JSON text


class MessageToolCall(msgspec.Struct, frozen=True):
    """A call an earlier ``assistant`` turn made, as OpenAI sends it back in history."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOOL_CALL_ID_CHARS)]
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, frozen=True):
    """One turn of a conversation, as every chat template takes it: an ``assistant``
    turn may carry the ``tool_calls`` it made, a ``tool`` turn answers one of them
    (``tool_call_id``)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)] = ""
    tool_calls: Annotated[tuple[MessageToolCall, ...], msgspec.Meta(max_length=MAX_TOOLS)] = ()
    tool_call_id: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOOL_CALL_ID_CHARS)] | None
    ) = None


class ChatRequest(SamplingParams, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The arguments of ``ModelManager.chat``/``stream_chat``: messages rendered through
    the model's chat template (see docs/compat.md), then sampled like an
    :class:`InferRequest`."""

    messages: Annotated[tuple[ChatMessage, ...], msgspec.Meta(max_length=MAX_CHAT_MESSAGES)]
    model: ModelId | None = None
    stream: bool = True
    keep_alive: KeepAlive | None = None  # how long the model stays loaded after this
    format: ResponseFormat | None = None
    # Function tools the model may call (modeld.tools checks them and makes the grammar);
    # tool_choice None means "auto" when there are tools.
    tools: Annotated[tuple[Tool, ...], msgspec.Meta(max_length=MAX_TOOLS)] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    grammar: RawGrammar | None = None  # GBNF of the client's own (llama-server's field)
    truncate: bool = False  # too long for the context: the oldest turns go (Ollama's way)

    def __post_init__(self) -> None:
        super().__post_init__()
        messages = self.messages
        if not isinstance(messages, tuple) or not all(
            isinstance(m, ChatMessage) for m in messages
        ):  # a list, or plain {"role", "content"} mappings, from a library caller
            converted = tuple(
                m if isinstance(m, ChatMessage) else msgspec.convert(m, ChatMessage)
                for m in messages
            )
            msgspec.structs.force_setattr(self, "messages", converted)
        if not isinstance(self.tools, tuple) or not all(isinstance(t, Tool) for t in self.tools):
            tools = msgspec.convert(list(self.tools), tuple[Tool, ...])  # plain mappings
            msgspec.structs.force_setattr(self, "tools", tools)
        if isinstance(self.tool_choice, dict):
            choice = msgspec.convert(self.tool_choice, NamedToolChoice)
            msgspec.structs.force_setattr(self, "tool_choice", choice)


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True):
    """Part of tool call ``index`` as it streams: the first delta of a call has ``id`` and
    ``name``, the next its ``arguments`` (JSON text)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Chunk(msgspec.Struct, frozen=True):
    """Text produced since the last chunk and how many tokens made it; for a request
    with tools, ``text`` is content only and ``tool_calls`` the calls it completed.
    ``logprobs`` (when the request asked) holds the entries of the tokens whose text is
    in this chunk, each exactly once over a stream."""

    text: str
    tokens: int
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


class GenerationMetrics(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_ms: float = 0.0
    load_ms: float = 0.0
    ttft_ms: float = 0.0
    prompt_eval_ms: float = 0.0
    eval_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_second: float = 0.0


class GenerationResult(msgspec.Struct, frozen=True):
    """The terminal record of one generation: exactly one per request."""

    done_reason: DoneReason
    model: str
    request_id: str
    metrics: GenerationMetrics
    error: dict[str, str] | None = None
    # the calls the answer made (a request with tools); its text is then content only
    tool_calls: tuple[MessageToolCall, ...] = ()
    # one entry per generated token that produced text, in order, when read whole
    # (Generation.read_whole); () when streamed: the chunks carried them; None: not asked
    logprobs: tuple[TokenLogprob, ...] | None = None


class EmbeddingResult(msgspec.Struct, frozen=True):
    """Vectors for the inputs of one ``ModelManager.embed`` call, in input order, each
    L2-normalised; ``prompt_tokens`` counts the tokens of every input."""

    model: str
    embeddings: list[list[float]]
    prompt_tokens: int
    load_ms: float = 0.0  # waiting for the model to load, if it was not
    total_ms: float = 0.0  # from admission to the last vector
