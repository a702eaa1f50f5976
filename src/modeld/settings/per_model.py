"""Per-model settings: the TOML config's ``[models."<id>"]`` tables.

They live in ``Settings.models`` and nowhere else: whoever needs a model's settings asks
the manager's current ``Settings`` (``settings.model(model_id)``), so replacing the
``Settings`` (a config reload) replaces them everywhere at once. A new per-model setting
is one field of :class:`ModelSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import msgspec

from modeld.settings.keep_alive import KeepAlive
from modeld.sizes import MAX_CONTEXT_TOKENS
from modeld.types import SamplingParams

__all__ = [
    "NO_MODEL_SETTINGS",
    "SAMPLING_FIELDS",
    "ContextTokens",
    "GpuLayers",
    "ModelSettings",
    "ResolvedModel",
    "Threads",
    "check_models_table",
    "flatten_table",
    "template_file",
]

ContextTokens = Annotated[int, msgspec.Meta(ge=16, le=MAX_CONTEXT_TOKENS)]
GpuLayers = Annotated[int, msgspec.Meta(ge=-1, le=1024)]
Threads = Annotated[int, msgspec.Meta(ge=1, le=1024)]
# Names clients may use instead of the file name ("gemma", "org/model:tag"); never a path
# on disk (an alias only ever maps to a configured model id).
Alias = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+/\-]{0,127}$", max_length=128)
]
SAMPLING_FIELDS = frozenset(f.name for f in msgspec.structs.fields(SamplingParams))
_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2")


class ModelSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Settings for one model id; ``None`` means "the global setting".

    ``defaults`` holds per-model defaults of any :class:`~modeld.types.SamplingParams`
    field (in TOML they are written as plain keys of the table, ``temperature = 0.2``):
    they apply to the fields a request did not set.
    """

    aliases: tuple[Alias, ...] = ()
    chat_template: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)] | None = None
    # The tool-call format (modeld.tools.ToolFormat's values); None: read from the template
    tool_format: Literal["hermes", "llama3", "mistral", "generic"] | None = None
    n_ctx: ContextTokens | None = None
    n_gpu_layers: GpuLayers | None = None
    threads: Threads | None = None
    pin: bool = False
    keep_alive: KeepAlive | None = None  # how long it stays loaded idle; else --keep-alive
    defaults: dict[str, Any] = {}

    def __post_init__(self) -> None:
        unknown = sorted(set(self.defaults) - SAMPLING_FIELDS)
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}")
        try:
            msgspec.convert(self.defaults, SamplingParams)
        except msgspec.ValidationError as exc:
            raise ValueError(f"bad default: {exc}") from None


NO_MODEL_SETTINGS = ModelSettings()


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """What one model runs with: its id (an alias resolved) and each per-model setting
    in force, its own value else the global one. Made by ``Settings.resolve``, the one
    place that rule is written; read by loading, idle unload, the manager and the
    protocol layers."""

    id: str
    n_ctx: int
    threads: int
    n_gpu_layers: int
    keep_alive: KeepAlive
    chat_template: str | None
    pin: bool
    defaults: Mapping[str, object]  # its SamplingParams defaults (read-only)

    @classmethod
    def of(
        cls,
        model_id: str,
        own: ModelSettings,
        *,
        n_ctx: int,
        threads: int,
        n_gpu_layers: int,
        keep_alive: KeepAlive,
    ) -> ResolvedModel:
        """``own`` over the global values given."""
        return cls(
            id=model_id,
            n_ctx=n_ctx if own.n_ctx is None else own.n_ctx,
            threads=threads if own.threads is None else own.threads,
            n_gpu_layers=n_gpu_layers if own.n_gpu_layers is None else own.n_gpu_layers,
            keep_alive=keep_alive if own.keep_alive is None else own.keep_alive,
            chat_template=own.chat_template,
            pin=own.pin,
            defaults=MappingProxyType(dict(own.defaults)),
        )


def template_file(chat_template: str) -> Path | None:
    """The Jinja file a ``chat_template`` value names, or None for a llama.cpp built-in
    template name: a value with a ``/`` or a Jinja suffix is a file."""
    if "/" in chat_template or chat_template.endswith(_TEMPLATE_SUFFIXES):
        return Path(chat_template).expanduser()
    return None


def check_models_table(models: dict[str, ModelSettings]) -> None:
    """Aliases are unique, and never another model's id. Raises ValueError naming it."""
    from modeld.errors import InvalidModelId
    from modeld.registry import check_model_id

    owner: dict[str, str] = {}
    for model_id in models:
        try:
            check_model_id(model_id)
        except InvalidModelId as exc:
            raise ValueError(f"model id {model_id!r}: {exc.message}") from None
    for model_id, settings in models.items():
        for alias in settings.aliases:
            if alias in models:
                raise ValueError(f"alias {alias!r} of {model_id!r} is itself a model id")
            if alias in owner:
                raise ValueError(f"alias {alias!r} is given to {owner[alias]!r} and {model_id!r}")
            owner[alias] = model_id


def flatten_table(table: dict[str, Any]) -> dict[str, Any]:
    """A TOML ``[models."<id>"]`` table in :class:`ModelSettings`' shape: its sampling
    keys gathered into ``defaults``."""
    own = {key: value for key, value in table.items() if key not in SAMPLING_FIELDS}
    sampling = {key: value for key, value in table.items() if key in SAMPLING_FIELDS}
    if sampling:
        if not isinstance(own.get("defaults", {}), dict):
            return table  # msgspec names the bad type
        own["defaults"] = {**own.get("defaults", {}), **sampling}
    return own
