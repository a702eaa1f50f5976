"""How long an idle instance stays loaded: the keep-alive, written as Ollama writes it.

A keep-alive is a number of seconds (``300``, ``0.5``) or a Go-style duration string
(``"5m"``, ``"1h30m"``, ``"250ms"``, a bare ``"300"`` meaning seconds); any negative value
means "never unload", ``0`` means "unload as soon as the model is idle". The same type is
used by ``--keep-alive``, the ``[models."<id>"]`` tables and the request bodies, so one
pattern decides what is a valid keep-alive everywhere.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

import msgspec

__all__ = [
    "DEFAULT_KEEP_ALIVE",
    "FOREVER_S",
    "KeepAlive",
    "explain_validation_error",
    "keep_alive_seconds",
]

DEFAULT_KEEP_ALIVE = "5m"  # Ollama's default
# Beyond a century a keep-alive is "never": no clock arithmetic overflows a date.
FOREVER_S = 100 * 365.25 * 86400

_UNIT_S = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNITS = "|".join(sorted(_UNIT_S, key=len, reverse=True))
_SEGMENT = re.compile(rf"({_NUMBER})({_UNITS})")
_PATTERN = rf"^[+-]?(?:(?:{_NUMBER}(?:{_UNITS}))+|{_NUMBER})$"

_EXPECTED = "a duration such as '5m', '1h30m' or '300' (seconds), or -1 for never"
_PATTERN_MISMATCH = f"Expected `str` matching regex {_PATTERN!r}"

KeepAlive = (
    Annotated[str, msgspec.Meta(pattern=_PATTERN, max_length=64)]
    | Annotated[float, msgspec.Meta(ge=-FOREVER_S, le=FOREVER_S)]
)


def keep_alive_seconds(value: str | float) -> float:
    """Seconds an idle instance stays loaded; ``math.inf`` for never.

    Raises ``ValueError`` for a string that is not a duration (a decoded
    :data:`KeepAlive` never is one).
    """
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(_PATTERN, text):
            raise ValueError(f"{value!r} is not a duration such as '5m', '1h30m' or '300'")
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if re.fullmatch(_NUMBER, body):
            seconds = float(body)
        else:
            seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _SEGMENT.findall(body))
        value = sign * seconds
    if value < 0 or value >= FOREVER_S or math.isnan(value):
        return math.inf
    return float(value)


def explain_validation_error(message: str) -> str:
    """msgspec's message for a keep-alive that is not a duration quotes the pattern;
    say what is expected instead."""
    return message.replace(_PATTERN_MISMATCH, f"Expected {_EXPECTED}")
