"""modeld's exception tree.

Every error a caller can meet is a :class:`ModeldError` with a stable ``code`` (the wire
string in JSON error bodies). HTTP statuses live in one table in ``modeld.api.errors``.

    ModeldError
    ├── InvalidRequest            bad_request           the request itself is wrong
    │   ├── InvalidModelId        invalid_model_id      unsafe or malformed model id
    │   ├── PayloadTooLarge       payload_too_large     body over --max-body-bytes
    │   ├── RequestBodyTimeout    request_timeout       body not received in time
    │   ├── HeadersTooLarge       headers_too_large     too many header lines, or too long
    │   ├── ConfigError           bad_config            a setting has a bad value
    │   ├── ContextLengthExceeded context_length_exceeded  the prompt alone fills the context
    │   ├── NoChatTemplate        no_chat_template      chat asked of a model without one
    │   └── ChatTemplateError     chat_template_error   the template refused the chat
    ├── ClientDisconnected        client_disconnected   the client left before its answer
    ├── ModelNotFound             model_not_found       no such file in the models dir
    ├── NoDefaultModel            no_default_model      ``model`` omitted, none configured
    ├── ModelInvalid              model_invalid         the GGUF file fails validation
    ├── ModelTooLarge             model_too_large       cannot fit even an empty budget
    ├── ModelLoadFailed           model_load_failed     llama.cpp refused the file
    │   └── ModelCoolingDown      model_cooling_down    a recent load failed; retry later
    ├── Overloaded                (abstract)            backpressure; carries retry_after_s
    │   ├── QueueFull             queue_full            the model's queue is at its depth
    │   ├── QueueTimeout          queue_timeout         waited longer than max_wait_ms
    │   ├── TooManyInflight       too_many_inflight     global in-flight cap reached
    │   └── MemoryBusy            memory_busy           only busy instances block the load
    ├── ShuttingDown              shutting_down         the manager no longer admits work
    ├── ResourcesExhausted        resources_exhausted   out of file descriptors (EMFILE)
    ├── ModelsDirUnavailable      models_dir_unavailable  the models dir did not answer
    ├── RequestNotFound           request_not_found     unknown request id (cancel)
    ├── ForbiddenHost             forbidden_host        Host header not allowed
    ├── Unauthorized              unauthorized          no API key, or not a valid one
    ├── InferTimeout              infer_timeout         never started within infer_timeout
    ├── EngineError               engine_error          llama.cpp failed mid-generation
    ├── MemoryProbeError          memory_probe_failed   NVML or /proc cannot measure
    ├── TokenLoopUnavailable      token_loop_unavailable  the C loop cannot load here
    ├── Unsupported               not_supported         an operation modeld does not offer
    ├── ModelUnloaded             model_unloaded        unloaded while it generated
    └── ReplicaUnavailable        replica_unavailable   (Ray) no replica took the request
        ├── ReplicaLost           replica_lost          (Ray) the replica died mid-answer
        └── ReplicaNotFound       replica_not_found     (Ray) the named replica is gone
"""

from __future__ import annotations

__all__ = [
    "ChatTemplateError",
    "ClientDisconnected",
    "ConfigError",
    "ContextLengthExceeded",
    "EngineError",
    "ForbiddenHost",
    "HeadersTooLarge",
    "InferTimeout",
    "InvalidModelId",
    "InvalidRequest",
    "MemoryBusy",
    "MemoryProbeError",
    "ModelCoolingDown",
    "ModelInvalid",
    "ModelLoadFailed",
    "ModelNotFound",
    "ModelTooLarge",
    "ModelUnloaded",
    "ModeldError",
    "ModelsDirUnavailable",
    "NoChatTemplate",
    "NoDefaultModel",
    "Overloaded",
    "PayloadTooLarge",
    "QueueFull",
    "QueueTimeout",
    "ReplicaLost",
    "ReplicaNotFound",
    "ReplicaUnavailable",
    "RequestBodyTimeout",
    "RequestNotFound",
    "ResourcesExhausted",
    "ShuttingDown",
    "TokenLoopUnavailable",
    "TooManyInflight",
    "Unauthorized",
    "Unsupported",
]


class ModeldError(Exception):
    """Base of every error modeld raises on purpose."""

    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ModeldError):
    code = "bad_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidModelId(InvalidRequest):
    code = "invalid_model_id"

    def __init__(self, message: str) -> None:
        super().__init__(message, field="model")


class ConfigError(InvalidRequest):
    """A setting has a bad value; the message names the setting and its source."""

    code = "bad_config"


class ContextLengthExceeded(InvalidRequest):
    """The prompt (or the rendered chat) alone leaves no room in the model's context:
    OpenAI's ``context_length_exceeded``. A ``max_tokens`` beyond the room left is a
    cap, never this."""

    code = "context_length_exceeded"


class NoChatTemplate(InvalidRequest):
    """The model has no chat template and none is configured for it: chat cannot know
    how the model expects a conversation (completions still work)."""

    code = "no_chat_template"

    def __init__(self, message: str) -> None:
        super().__init__(message, field="messages")


class ChatTemplateError(InvalidRequest):
    """The chat template refused the conversation (its own ``raise_exception``: a role it
    does not support, turns out of order), or the sandbox stopped it."""

    code = "chat_template_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, field="messages")


class ClientDisconnected(ModeldError):
    """The client closed the connection before its request was read or answered: its
    doing, not a server error (logged as 499, as nginx does)."""

    code = "client_disconnected"


class ModelNotFound(ModeldError):
    code = "model_not_found"
    field = "model"  # the parameter every protocol's error names


class NoDefaultModel(ModeldError):
    code = "no_default_model"


class ModelInvalid(ModeldError):
    code = "model_invalid"


class ModelTooLarge(ModeldError):
    code = "model_too_large"


class ModelLoadFailed(ModeldError):
    code = "model_load_failed"


class ModelCoolingDown(ModelLoadFailed):
    code = "model_cooling_down"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(ModeldError):
    """Backpressure: the client should retry after ``retry_after_s``."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(Overloaded):
    code = "queue_full"


class QueueTimeout(Overloaded):
    code = "queue_timeout"


class TooManyInflight(Overloaded):
    code = "too_many_inflight"


class MemoryBusy(Overloaded):
    code = "memory_busy"


class ShuttingDown(ModeldError):
    """Retryable: another replica, or this one once it has restarted, will answer."""

    code = "shutting_down"
    retry_after_s: float = 5.0


class ResourcesExhausted(ModeldError):
    """The process is out of file descriptors (or another OS resource): try again soon."""

    code = "resources_exhausted"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelsDirUnavailable(ModeldError):
    """The models directory did not answer in time (a stalled network filesystem)."""

    code = "models_dir_unavailable"

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestNotFound(ModeldError):
    code = "request_not_found"


class InferTimeout(ModeldError):
    code = "infer_timeout"


class EngineError(ModeldError):
    code = "engine_error"


class TokenLoopUnavailable(ModeldError):
    """The requested token loop cannot run here (C extension missing or built for another
    llama-cpp-python); set the loop to ``python`` explicitly to use the twin."""

    code = "token_loop_unavailable"


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"


class RequestBodyTimeout(InvalidRequest):
    code = "request_timeout"


class HeadersTooLarge(InvalidRequest):
    """More header lines, or more header bytes, than modeld reads (HTTP 431)."""

    code = "headers_too_large"


class ForbiddenHost(ModeldError):
    """The Host header names no allowed host (DNS-rebinding defence)."""

    code = "forbidden_host"


class Unauthorized(ModeldError):
    """An API key is configured and the request presented none, or a wrong one."""

    code = "unauthorized"


class MemoryProbeError(ModeldError):
    """The memory probe cannot measure (NVML failed, or ``/proc`` is unreadable)."""

    code = "memory_probe_failed"


class Unsupported(ModeldError):
    """A compatible API's operation that modeld does not offer (Ollama's ``pull``,
    ``create``, ``delete``...): models are the GGUF files in ``--models-dir``."""

    code = "not_supported"


class ModelUnloaded(ModeldError):
    """The model was unloaded (evicted, or by an operator) while it generated: for a
    protocol whose answers have no ``done_reason`` to say so (Ollama's, unstreamed)."""

    code = "model_unloaded"


class ReplicaUnavailable(ModeldError):
    """Under Ray: no replica could take the request (or the one chosen died before it
    answered); another may, shortly."""

    code = "replica_unavailable"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReplicaLost(ReplicaUnavailable):
    """Under Ray: the replica answering a stream died in the middle of it."""

    code = "replica_lost"


class ReplicaNotFound(ReplicaUnavailable):
    """Under Ray: the replica a request named (``X-Modeld-Replica``) is not serving."""

    code = "replica_not_found"
