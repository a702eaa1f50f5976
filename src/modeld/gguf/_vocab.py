"""Vocabulary checks: the tokens llama.cpp looks up unconditionally, or parses.

A C++ exception thrown inside ``llama_tokenize`` is caught nowhere on its way to Python:
it ends the whole process (``std::terminate``, SIGABRT), with every other model in it.
Measured on llama-cpp-python 0.3.36 (tests/gguf/test_vocab_checks.py):

- an SPM (``llama``) or UGM (``t5``) tokenizer falls back to byte tokens for text no
  token covers, looking each byte up as ``<0xNN>`` (upper-case hex) or else as the raw
  one-byte string, with ``unordered_map::at``: one byte with neither form, and the first
  prompt containing it aborts the process (a vocabulary of three tokens aborts on the
  warm-up; one renamed byte token lets ``hello`` through and aborts on ``café``);
- PLaMo-2 looks bytes up as ``<0xNN>`` only;
- a BYTE-type token's text is parsed as ``<0xNN>`` (``text.substr(3, 2)``), and a WPM
  (``bert``) vocabulary aborts on any BYTE-type token;
- two tokens with the same text fail ``GGML_ASSERT(id_to_token.size() ==
  token_to_id.size())`` at load (an empty token counts as ``[EMPTY_<id>]``).

One streaming pass over the token strings; memory is eight bytes per token (a hash, to
find duplicates) plus the token-type array, both bounded by ``MAX_VOCAB``.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable

from modeld.errors import ModelInvalid
from modeld.gguf._raw import MAX_STRING_BYTES, KvEntry
from modeld.gguf._source import ByteSource

__all__ = ["check_vocabulary"]

TOKEN_TYPE_BYTE = 6
_BYTE_TOKEN = re.compile(rb"<0x([0-9A-F]{2})>")
_ANY_CASE_BYTE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")
# tokenizer.ggml.model -> how a missing byte is looked up (llama_vocab::byte_to_token)
_HEX_OR_RAW_FALLBACK = frozenset({"llama", "t5"})
_HEX_ONLY_FALLBACK = frozenset({"plamo2"})
# Vocabularies whose token_to_piece calls token_to_byte on a BYTE-type token, and the
# one in which token_to_byte aborts outright.
_PARSES_BYTE_TOKENS = frozenset({"llama", "t5", "gpt2", "hybriddna", "whitespace", "gemma4"})
_REFUSES_BYTE_TOKENS = frozenset({"bert"})


def check_vocabulary(
    source: ByteSource,
    label: str,
    tokenizer_model: str | None,
    tokens: KvEntry,
    token_types: KvEntry | None,
) -> None:
    """Raise :class:`ModelInvalid` for a vocabulary llama.cpp would abort on."""
    walker = ByteSource(source.fd, source.size_bytes, label)
    walker.position = tokens.data_offset
    # the texts byte fallback looks for: "<0xNN>" and single bytes
    hashes, short = walker.hash_strings(
        tokens.length, MAX_STRING_BYTES, "tokenizer.ggml.tokens", frozenset({1, 6})
    )
    model = tokenizer_model or ""
    _check_byte_tokens(source, label, model, token_types, short)
    _check_byte_fallback(label, model, short.values())
    _check_unique(walker, label, tokens, hashes)


def _check_byte_tokens(
    source: ByteSource,
    label: str,
    model: str,
    entry: KvEntry | None,
    short: dict[int, bytes],
) -> None:
    if entry is None:
        return
    import numpy as np  # a dependency of llama-cpp-python; loaded only here

    data = source.read_at(entry.data_offset, 4 * entry.length, "tokenizer.ggml.token_type")
    for index in np.flatnonzero(np.frombuffer(data, dtype="<i4") == TOKEN_TYPE_BYTE)[:1024]:
        _check_byte_token(label, model, int(index), short.get(int(index)))


def _check_byte_token(label: str, model: str, index: int, text: bytes | None) -> None:
    if model in _REFUSES_BYTE_TOKENS:
        raise ModelInvalid(
            f"{label}: token {index} is a BYTE token, which a {model!r} vocabulary "
            "cannot have (llama.cpp aborts on it)"
        )
    if model in _PARSES_BYTE_TOKENS and (text is None or not _ANY_CASE_BYTE.fullmatch(text)):
        raise ModelInvalid(
            f"{label}: token {index} is a BYTE token but its text is not <0xNN> "
            "(llama.cpp parses it as one)"
        )


def _check_byte_fallback(label: str, model: str, short: Iterable[bytes]) -> None:
    if model not in _HEX_OR_RAW_FALLBACK and model not in _HEX_ONLY_FALLBACK:
        return
    hex_seen, raw_seen = bytearray(256), bytearray(256)
    for text in short:
        match = _BYTE_TOKEN.fullmatch(text)
        if match:
            hex_seen[int(match.group(1), 16)] = 1
        elif len(text) == 1:
            raw_seen[text[0]] = 1
    if model in _HEX_ONLY_FALLBACK:
        missing = [b for b in range(256) if not hex_seen[b]]
    else:
        missing = [b for b in range(256) if not hex_seen[b] and not raw_seen[b]]
    if missing:
        shown = ", ".join(f"<0x{b:02X}>" for b in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise ModelInvalid(
            f"{label}: the {model!r} vocabulary lacks byte tokens {shown}{more}: llama.cpp "
            "aborts on the first prompt that needs one"
        )


def _check_unique(walker: ByteSource, label: str, tokens: KvEntry, hashes: array[int]) -> None:
    """Sort the hashes; only on a collision walk the tokens again for the real texts."""
    import numpy as np  # a dependency of llama-cpp-python; loaded only here

    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64))
    colliding = ordered[1:][ordered[1:] == ordered[:-1]]
    if not colliding.size:
        return
    suspects = {int(value) for value in colliding[:64]}
    seen: dict[bytes, int] = {}
    walker.position = tokens.data_offset
    for index, text in enumerate(
        walker.strings(tokens.length, MAX_STRING_BYTES, "tokenizer.ggml.tokens")
    ):
        text = text or b"[EMPTY_%d]" % index
        if hash(text) not in suspects:
            continue
        if text in seen:
            raise ModelInvalid(
                f"{label}: tokens {seen[text]} and {index} are both {_shown(text)} "
                "(llama.cpp aborts on a duplicate token)"
            )
        seen[text] = index


def _shown(text: bytes) -> str:
    return repr(text[:32].decode("utf-8", "replace"))
