"""Constructing a ``llama_cpp.Llama`` (and freeing what a failed construction left), and
routing llama.cpp's own log lines into modeld's log."""

from __future__ import annotations

import contextlib
import ctypes
import re
import traceback
from typing import Any

import llama_cpp
from loguru import logger

from modeld.engine.cpu_quirks import apply_cpu_quirks
from modeld.errors import ModelLoadFailed
from modeld.redact import redact_paths

__all__ = [
    "TemplateBlindLlama",
    "llama_log_level",
    "load_llama",
    "malloc_trim",
    "route_llama_log",
]

# ggml_log_level in the llama.cpp this release vendors (ggml.h): 1 debug, 2 info, 3 warn,
# 4 error, 5 continuation. (llama-cpp-python's own mapping still follows an older enum.)
# Its debug chatter and continuations are dropped at the source; info (hundreds of lines
# per load) goes to modeld's debug.
_LLAMA_LOG_LEVELS = {2: "DEBUG", 3: "WARNING", 4: "ERROR"}
# What llama.cpp says at level error when modeld's abort callback stops a decode (a
# client left, a request was cancelled or evicted): GGML_STATUS_ABORTED is 1, and
# llama_decode returns 2 for "aborted". A normal cancel, so debug, not error.
_ABORTED = re.compile(
    r"compute_async failed with error 1$|compute status: 1$|failed to decode, ret = 2$"
    r"|removing memory module entries"
)


def llama_log_level(level: int, message: str) -> str | None:
    """The modeld log level of one llama.cpp line (None: dropped)."""
    name = _LLAMA_LOG_LEVELS.get(level)
    if name in ("WARNING", "ERROR") and _ABORTED.search(message):
        return "DEBUG"
    return name


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's lines as modeld log records (``source: llama.cpp``) instead of raw
    stderr text, at the level :func:`llama_log_level` gives them."""
    if level not in _LLAMA_LOG_LEVELS:
        return
    message = text.decode("utf-8", "replace").strip()
    name = llama_log_level(level, message)
    if name and message:
        # "{}": llama.cpp text may hold braces, which loguru would take as a format
        logger.log(name, "{}", redact_paths(message), source="llama.cpp")


llama_cpp.llama_log_set(route_llama_log, ctypes.c_void_p(0))
apply_cpu_quirks()


_TEMPLATE_KEYS = "tokenizer.chat_template"


class TemplateBlindLlama(llama_cpp.Llama):
    """A ``Llama`` that never sees the file's chat templates.

    ``Llama.__init__`` compiles every ``tokenizer.chat_template*`` value it finds in
    ``self.metadata`` with its own Jinja environment, which bounds neither time nor
    memory, and Jinja folds constant expressions while compiling: a file whose template
    holds ``{{ 'x'|center(10**9) }}`` would run that at load, in the probe child and in
    the server. No ``chat_format``/``chat_handler`` argument stops that loop, so the
    metadata it reads has the template keys taken out as it is assigned;
    :attr:`file_metadata` keeps them for modeld, which compiles and renders templates
    only in :mod:`modeld.chat`'s bounded sandbox.
    """

    file_metadata: dict[str, str]

    @property
    def metadata(self) -> dict[str, str]:
        return self._metadata_without_templates

    @metadata.setter
    def metadata(self, value: dict[str, str]) -> None:
        self.file_metadata = dict(value)
        self._metadata_without_templates = {
            key: text for key, text in value.items() if not key.startswith(_TEMPLATE_KEYS)
        }


def load_llama(path: str, label: str, **params: Any) -> TemplateBlindLlama:
    """``Llama(**params)``, and on any failure whatever it allocated is freed now.

    A ``Llama`` whose ``__init__`` raises has often created its model and context
    already (a ``MemoryError`` from its logits array comes last); the exception's
    traceback keeps the half-built object alive for as long as the exception lives, so
    that memory stayed held (about 1 GB of address space for Gemma) while the budget
    counted it free. Here the object is closed, the traceback dropped (the cause is kept
    for its type and message), and the heap trimmed.
    Raises :class:`ModelLoadFailed` (paths in llama.cpp's message become ``label``).
    """
    llama = TemplateBlindLlama.__new__(TemplateBlindLlama)
    try:
        llama.__init__(**params)  # type: ignore[misc]
    except (Exception, MemoryError) as exc:
        message = _failure_message(exc, path, label)
        if hasattr(llama, "_stack"):
            with contextlib.suppress(Exception):
                llama.close()
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        del llama
        malloc_trim()
        raise ModelLoadFailed(message) from exc
    return llama


def _failure_message(error: BaseException, path: str, label: str) -> str:
    if isinstance(error, MemoryError):
        return f"{label}: out of memory while llama.cpp loaded it ({error})"
    text = str(error).replace(path, label)
    return redact_paths(f"llama.cpp could not load {label}: {text}")


def malloc_trim() -> None:
    """Hand freed heap pages back to the OS so RSS reflects what is really held."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
