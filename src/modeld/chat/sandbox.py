"""The one Jinja environment chat templates are rendered in: Jinja2's immutable sandbox,
plus bounds on what the sandbox leaves open.

A chat template comes from a model file, which is untrusted input (CVE-2024-34359: a GGUF
whose template ran arbitrary code). The sandbox stops attribute tricks and calls of unsafe
objects; it does not bound time or memory (Jinja's own docs say so). So, on top of it:

* one-step blow-ups are refused before they allocate: ``*``, ``+`` and ``~`` making a
  value over :data:`MAX_VALUE_CHARS`, ``**`` with a large exponent, ``%`` and
  ``str.format`` with a huge field width, and any call or filter given an integer
  argument over :data:`MAX_INT_ARGUMENT` (``center(10**9)``, ``indent``,
  ``tojson(indent=...)``);
* :func:`render_bounded` runs the render under a tracer (every line of the template's
  code, every call in Jinja's) that stops it past a deadline or once the process has
  grown by :data:`MAX_RENDER_GROWTH_BYTES` (a loop building a huge structure step by
  step), and stops reading output past a size limit.

What is left is the rest of the sandbox's nature: one operation on bounded inputs can
still allocate a few times :data:`MAX_VALUE_CHARS` before a check sees it.

Whatever stops a render is a :class:`TemplateRefused` with a message that says why.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "MAX_INT_ARGUMENT",
    "MAX_RENDER_GROWTH_BYTES",
    "MAX_VALUE_CHARS",
    "RENDER_DEADLINE_S",
    "OutputTooLong",
    "TemplateRefused",
    "TemplateSandbox",
    "compile_template",
    "render_bounded",
]

MAX_VALUE_CHARS = 4 * 1024 * 1024
MAX_INT_ARGUMENT = 100_000
MAX_EXPONENT = 64
RENDER_DEADLINE_S = 2.0
MAX_RENDER_GROWTH_BYTES = 512 * 1024 * 1024
_TRACE_CHECK_EVERY = 16  # traced events between two looks at the clock and the peak RSS
_TEMPLATE_FILENAME = "<template>"  # what Jinja names the code it compiles a template to
_HUGE_WIDTH = re.compile(r"\d{7,}|%[-#0 +]*\*")


class TemplateRefused(Exception):
    """A template was stopped: too slow, too hungry, or asked for something refused."""


class OutputTooLong(TemplateRefused):
    """The rendered chat is longer than the context could hold: the conversation is too
    long, not the template at fault."""


class _RaisedByTemplate(Exception):
    """``raise_exception(...)`` called by the template itself."""


def _raise_exception(message: object) -> None:
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise SecurityError("strftime_now takes a short format string")
    return datetime.now().strftime(fmt)


def _check_int_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_ARGUMENT:
            raise SecurityError(f"integer argument {value} is over {MAX_INT_ARGUMENT}")


def _weight(value: Any) -> int:
    """Characters a value stands for once joined or printed: a string's length, a list's
    items and the strings in it (one level deep: deeper lists are built step by step,
    and the tracer sees the steps)."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, list | tuple):
        return len(value) + sum(len(item) for item in value if isinstance(item, str | bytes))
    return 0


def _check_weight(value: int, what: str) -> None:
    if value > MAX_VALUE_CHARS:
        raise SecurityError(f"{what} would make a value over {MAX_VALUE_CHARS} characters")


def _check_growth(name: str, args: tuple[Any, ...]) -> None:
    """The two string operations whose result can dwarf their inputs in one step."""
    if name == "join" and args:
        items = args[0]
        if isinstance(items, list | tuple):
            separator = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            _check_weight(_weight(items) + len(separator) * len(items), "join")
    elif name == "replace" and len(args) >= 3:
        text, old, new = args[0], args[1], args[2]
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            count = text.count(old) if old else len(text) + 1
            _check_weight(len(text) + count * len(new), "replace")
    elif name == "format" and args and isinstance(args[0], str) and _HUGE_WIDTH.search(args[0]):
        raise SecurityError("the format filter with a huge or '*' field width")


class _IgnoreGenerationTag(jinja2.ext.Extension):
    """Hugging Face templates mark assistant text with ``{% generation %}``; only training
    code reads it, so its body renders as plain text (as transformers does)."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own type for it)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: no HTML escaping, non-ASCII kept as it is."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class TemplateSandbox(ImmutableSandboxedEnvironment):
    """``ImmutableSandboxedEnvironment`` as transformers and llama.cpp configure it for
    chat templates (``trim_blocks``, ``lstrip_blocks``, loop controls, ``tojson``,
    ``raise_exception``, ``strftime_now``), with the one-step bounds above."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _IgnoreGenerationTag],
            autoescape=False,
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_int_arguments(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):  # "sep".join(items), text.replace(old, new)
            name = getattr(__obj, "__name__", "")
            _check_growth(name, (args[0], owner) if name == "join" and args else (owner, *args))
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            count = right if isinstance(right, int) else left if isinstance(left, int) else 0
            _check_weight(max(_weight(left), _weight(right)) * max(int(count), 0), "'*'")
        elif operator == "+":
            _check_weight(_weight(left) + _weight(right), "'+'")
        elif operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent {right} is over {MAX_EXPONENT}")
        elif operator == "%" and isinstance(left, str) and _HUGE_WIDTH.search(left):
            raise SecurityError("'%' formatting with a huge or '*' field width")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = getattr(value, "__self__", "")
        if isinstance(fmt, str) and _HUGE_WIDTH.search(fmt):
            raise SecurityError("str.format with a huge field width")
        return wrapped


def _bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    marked = getattr(fn, "jinja_pass_arg", None) is not None  # its first argument is jinja's

    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_int_arguments(args, kwargs)
        _check_growth(name, args[1:] if marked else args)
        return fn(*args, **kwargs)

    return bounded


def _bounded_join(join: Callable[[Any], str]) -> Callable[[Any], str]:
    """Jinja's ``~`` operator (``str_join``/``markup_join``), refusing to build a string
    over :data:`MAX_VALUE_CHARS` (a loop doubling a string through a namespace)."""

    def bounded(seq: Any) -> str:
        items = list(seq)
        for item in items:  # a list printed by '~' weighs what its items weigh
            _check_weight(_weight(item), "'~'")
        parts = [item if isinstance(item, str) else str(item) for item in items]
        _check_weight(sum(len(part) for part in parts), "'~'")
        return join(parts)

    return bounded


def compile_template(
    source: str,
    *,
    deadline_s: float = RENDER_DEADLINE_S,
    max_growth_bytes: int = MAX_RENDER_GROWTH_BYTES,
) -> jinja2.Template:
    """``source`` compiled in a fresh :class:`TemplateSandbox`, its ``~`` bounded.

    Jinja evaluates constant expressions while it compiles (``{{ 'x'|center(10**9) }}``
    would run there, not at render), so the compile runs within the same bounds as a
    render: the sandbox's one-step checks refuse such a fold, and the tracer stops a
    compile past ``deadline_s`` or ``max_growth_bytes`` of process growth.

    Raises ``jinja2.TemplateSyntaxError``, :class:`TemplateRefused` past a bound.
    """
    with _bounded(deadline_s, max_growth_bytes, "compiling the chat template"):
        template = TemplateSandbox().from_string(source)
    namespace = template.root_render_func.__globals__  # the compiled module's globals
    for name in ("str_join", "markup_join"):
        if name in namespace:
            namespace[name] = _bounded_join(namespace[name])
    return template


class _ResidentSize:
    """The process's resident size now, from ``/proc/self/statm`` (one ``pread`` per look).

    Not the peak (``ru_maxrss``): a long-running server has long since peaked higher
    (a model load), so growth from the peak would let a render grow by that much more
    unseen. Elsewhere than Linux, the peak is all there is.
    """

    _PAGE_BYTES = resource.getpagesize()

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None

    def bytes(self) -> int:
        if self._fd is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._PAGE_BYTES

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def render_bounded(
    chunks: Callable[[], Iterator[str]],
    *,
    max_chars: int,
    deadline_s: float = RENDER_DEADLINE_S,
    max_growth_bytes: int = MAX_RENDER_GROWTH_BYTES,
) -> str:
    """Join what ``chunks()`` (a template's ``generate``) yields, on this thread, stopped
    past ``deadline_s``, ``max_chars`` of output, or ``max_growth_bytes`` of process
    growth (measured every few template lines: other threads' growth counts too, so the
    bound is generous).

    Raises :class:`TemplateRefused`, or what the template raised (``SecurityError``,
    ``TemplateError``, the template's own ``raise_exception``) as :class:`TemplateRefused`
    with the template's message.
    """
    parts: list[str] = []
    total = 0
    try:
        with _bounded(deadline_s, max_growth_bytes, "the chat template"):
            for part in chunks():
                total += len(part)
                if total > max_chars:
                    raise OutputTooLong(f"the rendered chat is over {max_chars} characters")
                parts.append(part)
    except TemplateRefused:
        raise
    except _RaisedByTemplate as exc:
        raise TemplateRefused(str(exc)) from None
    except SecurityError as exc:
        raise TemplateRefused(
            f"the chat template did something the sandbox forbids: {exc}"
        ) from None
    except RecursionError:
        raise TemplateRefused("the chat template recursed too deeply") from None
    except MemoryError:
        raise TemplateRefused("the chat template ran out of memory") from None
    except Exception as exc:  # TemplateError, TypeError, ... from the template's own code
        raise TemplateRefused(f"the chat template failed: {type(exc).__name__}: {exc}") from None
    return "".join(parts)


@contextlib.contextmanager
def _bounded(deadline_s: float, max_growth_bytes: int, what: str) -> Iterator[None]:
    """Run the body under a tracer that raises :class:`TemplateRefused` past
    ``deadline_s`` or once the process has grown by ``max_growth_bytes`` (measured every
    few traced events: other threads' growth counts too, so the bound is generous)."""
    limit_s = time.monotonic() + deadline_s
    resident = _ResidentSize()
    rss_limit = resident.bytes() + max_growth_bytes
    events = 0

    def count(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal events
        events += 1
        if events % _TRACE_CHECK_EVERY == 0:
            if time.monotonic() > limit_s:
                raise TemplateRefused(f"{what} ran past {deadline_s:g} s")
            if resident.bytes() > rss_limit:
                raise TemplateRefused(
                    f"{what} grew the process by over {max_growth_bytes >> 20} MiB"
                )
        # Lines are counted in the template's own code (its loops may call nothing); in
        # Jinja's code every call counts (a filter's loop resumes a generator per item).
        return count if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(count)
    try:
        yield
    finally:
        sys.settrace(previous)
        resident.close()
