"""One request as every handler meets it: its typed context, its body read within the
limits, and the only calls the API layer makes to generate or embed.

Every generation and embedding of every protocol goes through :class:`Edge`, so the
engine-facing contract (``choices``, ``embed``, ``sampling_defaults``) is used from this
one module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from starlette.requests import Request

from modeld.api.bodies import read_body
from modeld.api.context import RequestContext, context_of
from modeld.scheduling.choices import ChoiceRun
from modeld.scheduling.manager import ModelManager
from modeld.settings.config import Settings
from modeld.settings.keep_alive import KeepAlive
from modeld.types import ChatRequest, EmbeddingInput, EmbeddingResult, InferRequest

__all__ = ["Edge", "manager_of"]


def manager_of(request: Request) -> ModelManager:
    """The app's manager (set by :func:`modeld.api.app.create_app`)."""
    manager: ModelManager = request.app.state.manager
    return manager


@dataclass(frozen=True, slots=True)
class Edge:
    """A request, its context and the manager that serves it."""

    request: Request
    context: RequestContext
    manager: ModelManager

    @classmethod
    def of(cls, request: Request) -> Edge:
        return cls(request, context_of(request.scope), manager_of(request))

    @property
    def settings(self) -> Settings:
        return self.manager.settings

    async def body(self) -> bytes:
        """The whole body, bounded in size and time (413, 408, 499)."""
        settings = self.settings
        return await read_body(self.request, settings.max_body_bytes, settings.body_timeout)

    def defaults_for(self, name: str | None) -> Mapping[str, object]:
        """The configured sampling defaults of the model ``name`` stands for."""
        return self.manager.sampling_defaults(name)

    def choices(
        self, generate: InferRequest | ChatRequest, count: int = 1
    ) -> AbstractAsyncContextManager[ChoiceRun]:
        """The ``count`` choices of ``generate`` under this request's id, run one after
        another on one admission (not yet entered)."""
        return self.manager.choices(generate, count, request_id=self.context.request_id)

    async def embed(
        self,
        model: str | None,
        inputs: Sequence[EmbeddingInput],
        keep_alive: KeepAlive | None = None,
        *,
        truncate: bool = False,
    ) -> EmbeddingResult:
        self.context.model = model or self.settings.default_model
        return await self.manager.embed(
            model,
            inputs,
            request_id=self.context.request_id,
            keep_alive=keep_alive,
            truncate=truncate,
        )
