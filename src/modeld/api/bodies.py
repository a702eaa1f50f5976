"""Reading and decoding request bodies: bounded in size and time, decoded once by msgspec."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import anyio
import msgspec
from starlette.requests import Request
from starlette.types import Receive

from modeld.errors import ClientDisconnected, InvalidRequest, PayloadTooLarge, RequestBodyTimeout
from modeld.settings.keep_alive import explain_validation_error

__all__ = [
    "convert_fields",
    "decode_body",
    "decode_json",
    "decode_with_defaults",
    "read_body",
    "read_whole",
]

DefaultsFor = Callable[[str | None], Mapping[str, object]]

T = TypeVar("T")
_FIELD_AT = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)")
_UNKNOWN_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]*)`")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body of a Starlette request (see :func:`read_whole`)."""
    declared = request.headers.get("content-length", "")
    return await read_whole(request.receive, max_bytes, timeout_s, declared)


async def read_whole(
    receive: Receive, max_bytes: int, timeout_s: float, declared: str = ""
) -> bytes:
    """The whole body of an ASGI request, refusing early (from the declared
    ``Content-Length``) when it is too large: the one body reader of every edge (the
    app's routes and the Ray ingress).

    Raises :class:`PayloadTooLarge` (413), :class:`RequestBodyTimeout` (408), or
    :class:`ClientDisconnected` (499) when the client leaves mid-body.
    """
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body is over {max_bytes} bytes")
    parts: list[bytes] = []
    total = 0
    try:
        with anyio.fail_after(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected(f"the client left after {total} bytes of its body")
                part = bytes(message.get("body", b""))
                total += len(part)
                if total > max_bytes:
                    raise PayloadTooLarge(f"request body is over {max_bytes} bytes")
                parts.append(part)
                if not message.get("more_body", False):
                    return b"".join(parts)
    except TimeoutError:
        raise RequestBodyTimeout(f"request body not received within {timeout_s:g} s") from None


def decode_body(body: bytes, schema: type[T]) -> T:
    """Decode and validate in one pass. Every failure is a 400 naming the field."""
    decoded: T = decode_json(body, schema)
    return decoded


def decode_with_defaults(body: bytes, schema: type[T], defaults_for: DefaultsFor) -> T:
    """:func:`decode_body`, with the per-model defaults of the model the body names
    (``defaults_for(decoded.model)``) filling the fields the body does not set.

    The body is validated against ``schema`` first, so every error names its field as
    :func:`decode_body`'s do (a body only a generic JSON decode would refuse, such as a
    number out of range or nesting too deep, is refused in the field that holds it).
    """
    decoded = decode_body(body, schema)
    model = getattr(decoded, "model", None)
    defaults = defaults_for(model if isinstance(model, str) else None)
    if not defaults:
        return decoded
    given = msgspec.json.decode(body, type=dict[str, msgspec.Raw]).keys()
    missing = {name: value for name, value in defaults.items() if name not in given}
    if not missing:
        return decoded
    return convert_fields({**msgspec.to_builtins(decoded), **missing}, schema)


def convert_fields(fields: Mapping[str, object], schema: type[T]) -> T:
    """Validate already-decoded fields against ``schema``; a 400 naming the field."""
    try:
        return msgspec.convert(fields, schema)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: msgspec.ValidationError) -> InvalidRequest:
    message = explain_validation_error(str(exc))
    match = _UNKNOWN_FIELD.search(message) or _FIELD_AT.search(message)
    return InvalidRequest(message, field=match.group(1) if match else None)


def decode_json(body: bytes, schema: Any) -> Any:
    """``body`` decoded as ``schema`` (``Any``: plain JSON). Every failure is a 400."""
    if not body.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not valid UTF-8") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
