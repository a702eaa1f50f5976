"""Split a model's streamed output into content and tool calls, per format.

Content streams as it comes, except a tail that could still be the start of a call
opening (held back, so a call never leaks into content). A call is emitted once it is
complete: first its index, id and name, then its arguments (one fragment). An opening
whose call does not parse comes back as content, never as an exception.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modeld.tools.formats import ToolFormat
from modeld.types import FunctionCall, MessageToolCall

__all__ = ["ContentDelta", "Delta", "ToolCallDelta", "ToolCallParser", "collect"]


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """Part of call ``index``: the first delta of a call has ``id`` and ``name``, the
    next its ``arguments`` (JSON text)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Delta = ContentDelta | ToolCallDelta

# (opening, whether the opening is part of the call's JSON, only at the start of output)
_OPENINGS: dict[ToolFormat, tuple[tuple[str, bool, bool], ...]] = {
    ToolFormat.HERMES: (("<tool_call>", False, False),),
    ToolFormat.LLAMA3: (("<|python_tag|>", False, True), ("{", True, True)),
    ToolFormat.MISTRAL: (("[TOOL_CALLS]", False, False), ("[{", True, True)),
    ToolFormat.GENERIC: (("{", True, True),),
}
_CLOSING = {ToolFormat.HERMES: "</tool_call>"}


def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Feed it text as it streams (:meth:`feed`), then :meth:`finish`; each returns the
    deltas that text completed. ``new_id`` makes call ids (injected for tests)."""

    def __init__(self, fmt: ToolFormat, *, new_id: Callable[[], str] = _new_id) -> None:
        self._format = fmt
        self._new_id = new_id
        self._pending = ""  # text not yet classified
        self._call: str | None = None  # the body of the call being read
        self._opening = ""
        self._started = False  # something other than whitespace came out already
        self._calls = 0

    def feed(self, text: str) -> list[Delta]:
        self._pending += text
        return self._advance(final=False)

    def finish(self) -> list[Delta]:
        out = self._advance(final=True)
        if self._call is not None:
            out += self._close_call(self._call)
        elif self._pending:
            out.append(ContentDelta(self._pending))
        self._pending, self._call = "", None
        return out

    def _advance(self, *, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while True:
            if self._call is not None:
                closing = _CLOSING.get(self._format)
                self._call += self._pending
                self._pending = ""
                if closing is None or closing not in self._call:
                    return out
                body, _, rest = self._call.partition(closing)
                self._call, self._pending = None, rest
                out += self._close_call(body, closing)
                continue
            found = self._find_opening()
            if found is None:
                keep = 0 if final else self._held_back()
                emit = self._pending[: len(self._pending) - keep]
                if emit:
                    out.append(ContentDelta(emit))
                    self._started = self._started or bool(emit.strip())
                self._pending = self._pending[len(emit) :]
                return out
            at, opening, in_body, at_start = found
            if self._pending[:at] and not at_start:  # (whitespace before an answer's call)
                out.append(ContentDelta(self._pending[:at]))
            self._opening = opening
            start = at if in_body else at + len(opening)
            self._call, self._pending = "", self._pending[start:]
            self._started = True

    def _find_opening(self) -> tuple[int, str, bool, bool] | None:
        best: tuple[int, str, bool, bool] | None = None
        for opening, in_body, at_start in _OPENINGS[self._format]:
            if at_start:
                if self._started:
                    continue
                stripped = self._pending.lstrip()
                at = len(self._pending) - len(stripped) if stripped.startswith(opening) else -1
            else:
                at = self._pending.find(opening)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, opening, in_body, at_start)
        return best

    def _held_back(self) -> int:
        """How much of the pending tail might still become an opening."""
        held = 0
        for opening, _, at_start in _OPENINGS[self._format]:
            if at_start:
                if not self._started and opening.startswith(self._pending.lstrip()[: len(opening)]):
                    held = max(held, len(self._pending))
                continue
            for n in range(min(len(opening) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(opening[:n]):
                    held = max(held, n)
                    break
        return held

    def _close_call(self, body: str, closing: str = "") -> list[Delta]:
        calls = _parse_calls(self._format, body)
        if calls is None:  # not a call after all: the text as it came, opening included
            raw = body if self._opening in ("{", "[{") else self._opening + body
            content = _generic_content(self._format, body)
            return [ContentDelta(content if content is not None else raw + closing)]
        out: list[Delta] = []
        for name, arguments in calls:
            index = self._calls
            self._calls += 1
            out.append(ToolCallDelta(index=index, id=self._new_id(), name=name))
            out.append(ToolCallDelta(index=index, arguments=json.dumps(arguments)))
        return out


def _loads(text: str) -> Any:
    try:
        return json.loads(text.strip(), strict=False)
    except ValueError:
        return None


def _one_call(value: Any, key: str) -> tuple[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(key, value.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        arguments = _loads(arguments)
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def _parse_calls(fmt: ToolFormat, body: str) -> list[tuple[str, Any]] | None:
    if fmt is ToolFormat.LLAMA3:
        parts = [_one_call(_loads(p), "parameters") for p in body.split(";") if p.strip()]
    else:
        value = _loads(body)
        if fmt is ToolFormat.GENERIC:
            value = value.get("tool_calls") if isinstance(value, dict) else None
        items = value if isinstance(value, list) else [value]
        if fmt is ToolFormat.HERMES and isinstance(value, list):
            return None
        parts = [_one_call(item, "arguments") for item in items]
    if not parts or any(p is None for p in parts):
        return None
    return [p for p in parts if p is not None]


def _generic_content(fmt: ToolFormat, body: str) -> str | None:
    """The generic format's ``{"content": "..."}`` answer, as the content it carries."""
    if fmt is not ToolFormat.GENERIC:
        return None
    value = _loads(body)
    if isinstance(value, dict) and set(value) == {"content"} and isinstance(value["content"], str):
        return str(value["content"])
    return None


def collect(deltas: list[Delta]) -> tuple[str, tuple[MessageToolCall, ...]]:
    """A whole answer from its deltas: the content and the calls (a non-streamed reply,
    or ``ModelManager.chat``)."""
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    heads: dict[int, ToolCallDelta] = {}
    arguments: dict[int, str] = {}
    for delta in deltas:
        if isinstance(delta, ToolCallDelta) and delta.name is not None:
            heads[delta.index] = delta
        elif isinstance(delta, ToolCallDelta):
            arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
    calls = tuple(
        MessageToolCall(
            id=head.id or "",
            function=FunctionCall(name=head.name or "", arguments=arguments.get(index, "{}")),
        )
        for index, head in sorted(heads.items())
    )
    return content, calls
