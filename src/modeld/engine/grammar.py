"""Structured output: a response format (``"json"`` or a JSON schema) as a GBNF grammar
that llama.cpp's grammar sampler enforces token by token, in both token loops.

Two checks keep llama.cpp from ever being handed a grammar it refuses (its grammar code
reports errors as C++ exceptions, which from a C caller abort the process):
:func:`grammar_for_format` turns a schema into GBNF with :mod:`modeld.grammar` (bounded
before and while converting; an unsupported or oversized schema is an
:class:`InvalidRequest` naming ``format``), and :func:`check_grammar` builds and frees
the sampler on the model's worker before the answer starts (a grammar llama.cpp refuses
is a 400, never a stream that ends in an error).
"""

from __future__ import annotations

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF

from modeld.engine.fastgrammar import grammar_sampler
from modeld.errors import InvalidRequest
from modeld.grammar import DEFAULT_LIMITS, check_grammar_bounds, schema_grammar
from modeld.types import GrammarConstraint, ResponseFormat

__all__ = [
    "GRAMMAR_REFUSED",
    "MAX_GRAMMAR_BYTES",
    "check_grammar",
    "grammar_for_format",
    "grammar_for_request",
    "grammar_is_accepted",
]

# A grammar is parsed on every request and walked on every token: bounded, like a prompt.
MAX_GRAMMAR_BYTES = DEFAULT_LIMITS.max_grammar_bytes
GRAMMAR_REFUSED = "llama.cpp refused the grammar"
_ROOT = b"root"


def grammar_for_format(response_format: ResponseFormat) -> str:
    """The GBNF text for ``"json"`` (any JSON object) or a JSON schema.

    Pure Python (no model needed), so it runs before the request queues. Raises
    :class:`InvalidRequest` (field ``format``) for a schema over one of
    :class:`~modeld.grammar.SchemaLimits`' bounds or one a grammar cannot enforce
    (remote ``$ref``, ``not``, an unknown ``type``, ...).
    """
    if response_format == "json":
        return JSON_GBNF
    if not isinstance(response_format, dict):
        raise InvalidRequest('format must be "json" or a JSON schema object', field="format")
    return schema_grammar(response_format, param="format")


def grammar_for_request(
    response_format: ResponseFormat | None, raw_grammar: str | None
) -> str | None:
    """The grammar a request asks for: its ``format`` converted, or its own GBNF
    (``grammar``: llama-server's field) within the same bounds as a converted schema.
    Both at once is a 400 naming ``grammar``."""
    if raw_grammar is not None:
        if response_format is not None:
            raise InvalidRequest("give a grammar or a format, not both", field="grammar")
        return check_grammar_bounds(raw_grammar, param="grammar")
    return None if response_format is None else grammar_for_format(response_format)


def grammar_is_accepted(vocab: object, grammar: str) -> bool:
    """Whether llama.cpp parses ``grammar`` for this vocabulary (the sampler is built and
    freed at once). Only on the thread that owns the model."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), _ROOT)
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def check_grammar(vocab: object, grammar: str | GrammarConstraint, field: str = "format") -> None:
    """Raises :class:`InvalidRequest` (naming ``field``) when llama.cpp refuses
    ``grammar`` (a lazy one is built with its triggers); its reason is in the log
    (llama.cpp's own error line)."""
    if isinstance(grammar, str):
        accepted = "\x00" not in grammar and grammar_is_accepted(vocab, grammar)
    else:
        sampler = None if "\x00" in grammar.gbnf else grammar_sampler(vocab, grammar)
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        accepted = bool(sampler)
    if not accepted:
        raise InvalidRequest(f"{GRAMMAR_REFUSED}; its log line says why", field=field)
