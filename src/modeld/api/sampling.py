"""Each protocol's names for :class:`~modeld.types.SamplingParams`, derived from it.

A protocol says only what differs: the fields it calls by another name
(``max_tokens`` is Ollama's ``num_predict``), the fields it deliberately does not take,
and how a value it sends differs in meaning (a negative seed is "random"). The struct
that reads its wire fields is built from ``SamplingParams`` itself, so a new sampling
parameter reaches every protocol that takes it with no new line, and a test fails for a
protocol that neither maps it nor lists it as unsupported.

Bounds are not checked here: the request built from these fields checks them, and its
400 names the wire field (:attr:`SamplingNames.param_names`).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import UnionType
from typing import Any

import msgspec

from modeld.errors import InvalidRequest
from modeld.types import MAX_TOP_LOGPROBS, SamplingParams

__all__ = ["LOGPROBS", "SAMPLING_FIELDS", "SamplingNames", "logprob_fields", "stop_list"]

SAMPLING_FIELDS: tuple[str, ...] = SamplingParams.__struct_fields__
"""Every sampling parameter, in declaration order."""

LOGPROBS = "logprobs"
"""The one parameter the generation protocols do not read as a sampling option: each
says it as a switch and a count of its own (:func:`logprob_fields`)."""

Adapt = Callable[[Any], object]
"""A wire value as modeld's (None: leave the field to the model's defaults)."""


def stop_list(value: Any) -> object:
    """One stop string or a list of them, as the list modeld takes."""
    return [value] if isinstance(value, str) else value


def _wire_type(annotation: Any) -> Any:
    """The type a wire field of this parameter decodes as: the parameter's own type
    without its bounds, optional; a sequence also takes one bare item."""
    args = typing.get_args(annotation)
    union: Any = typing.Union
    if typing.get_origin(annotation) is tuple:
        sequence: Any = list
        return union[args[0], sequence[args[0]], None]
    if isinstance(annotation, UnionType) or typing.get_origin(annotation) is typing.Union:
        return annotation if type(None) in args else annotation | None
    return annotation | None


_HINTS = typing.get_type_hints(SamplingParams)


@dataclass(frozen=True)
class SamplingNames:
    """One protocol's reading of the sampling parameters."""

    protocol: str
    renamed: Mapping[str, str] = field(default_factory=dict)
    unsupported: frozenset[str] = frozenset()
    adapt: Mapping[str, Adapt] = field(default_factory=dict)
    struct: type[msgspec.Struct] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        wrong = (set(self.renamed) | set(self.unsupported) | set(self.adapt)) - set(SAMPLING_FIELDS)
        if wrong:
            raise ValueError(f"{self.protocol}: no sampling parameters {sorted(wrong)}")
        fields = [(self.wire(name), _wire_type(_HINTS[name]), None) for name in self.taken]
        object.__setattr__(
            self, "struct", msgspec.defstruct(f"{self.protocol}Sampling", fields, kw_only=True)
        )

    @property
    def taken(self) -> tuple[str, ...]:
        """The parameters this protocol reads, by modeld's names."""
        return tuple(name for name in SAMPLING_FIELDS if name not in self.unsupported)

    def wire(self, name: str) -> str:
        """``name`` as this protocol calls it."""
        return self.renamed.get(name, name)

    @property
    def param_names(self) -> dict[str, str]:
        """modeld's names to this protocol's, for the errors that name a field."""
        return {name: self.wire(name) for name in self.taken if self.wire(name) != name}

    def decode(self, body: bytes) -> msgspec.Struct:
        """The sampling fields of a JSON body (others ignored). Raises
        :class:`msgspec.ValidationError` / :class:`msgspec.DecodeError`."""
        decoded: msgspec.Struct = msgspec.json.decode(body, type=self.struct)
        return decoded

    def convert(self, raw: Mapping[str, Any]) -> msgspec.Struct:
        """The sampling fields of an already-decoded object (Ollama's ``options``)."""
        converted: msgspec.Struct = msgspec.convert(raw, self.struct)
        return converted

    def fields(self, decoded: msgspec.Struct) -> dict[str, object]:
        """The :class:`SamplingParams` fields ``decoded`` sets, by modeld's names (an
        absent one is left out, so the model's defaults fill it)."""
        fields: dict[str, object] = {}
        for name in self.taken:
            value = getattr(decoded, self.wire(name))
            if value is not None and name in self.adapt:
                value = self.adapt[name](value)
            if value is not None:
                fields[name] = value
        return fields


def logprob_fields(
    enabled: bool | None,
    top: object,
    *,
    enabled_param: str = "logprobs",
    top_param: str = "top_logprobs",
) -> dict[str, object]:
    """A protocol's log-probability switch and count (OpenAI chat's and Ollama's
    ``logprobs: true`` + ``top_logprobs: n``; completions' ``logprobs: n`` is a count
    that is its own switch: pass ``enabled`` as whether it was given) as :class:`SamplingParams`'
    ``logprobs``; none when not asked. Checked before any work: a count outside 0 to
    :data:`~modeld.types.MAX_TOP_LOGPROBS`, or a count without the switch, is a 400
    naming the wire field."""
    if top is not None and (type(top) is not int or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise InvalidRequest(
            f"{top_param} is an integer from 0 to {MAX_TOP_LOGPROBS}", field=top_param
        )
    if not enabled:
        if top:
            raise InvalidRequest(f"{top_param} needs {enabled_param}: true", field=top_param)
        return {}
    return {LOGPROBS: top or 0}
