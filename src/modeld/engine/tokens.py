"""A model's tokenizer, bounded by its context: what a prompt may cost before llama.cpp's
tokenizer sees it, and whether it leaves room to generate.

Used only on the model's worker thread, like the context it sizes against.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp

from modeld.errors import ContextLengthExceeded, InvalidRequest

__all__ = ["Tokenizer"]


class Tokenizer:
    """Tokenizes through buffers bounded by ``n_ctx`` (never by model metadata)."""

    def __init__(self, vocab: object, n_ctx: int) -> None:
        self._vocab = vocab
        self.n_ctx = n_ctx
        # No token covers more bytes than the longest piece, so a prompt longer than
        # n_ctx pieces cannot fit the context: refused before the tokenizer (whose cost
        # grows faster than linearly on some inputs) ever sees it.
        self.max_prompt_bytes = n_ctx * _longest_piece_bytes(vocab)

    @property
    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary has it ("" for a missing token: -1)."""
        if token < 0:
            return ""
        return str(llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8"))

    def tokenize(
        self, prompt: str, *, add_bos: bool | None = None, field: str = "prompt"
    ) -> list[int]:
        """Tokens of ``prompt``, control tokens parsed; ``add_bos`` defaults to what the
        vocabulary asks for.

        Raises :class:`InvalidRequest` (naming ``field``) when the prompt cannot be
        encoded or is too long.
        """
        text = encoded(prompt, field)
        if len(text) > self.max_prompt_bytes:
            raise ContextLengthExceeded(
                f"{field} is {len(text)} bytes; no {self.n_ctx}-token context holds more "
                f"than {self.max_prompt_bytes} bytes of this model's tokens",
                field=field,
            )
        add_bos = self.add_bos if add_bos is None else add_bos
        count, tokens = self.raw(text, self.n_ctx, add_bos, parse_special=True)
        if count < 0:
            raise ContextLengthExceeded(
                f"{field} is {-count} tokens; the context holds {self.n_ctx}", field=field
            )
        return tokens

    def tokenize_end(self, prompt: str, keep_tokens: int, *, field: str = "prompt") -> list[int]:
        """The last ``keep_tokens`` tokens of ``prompt`` (after the BOS the vocabulary
        asks for): Ollama's truncation of a raw prompt. Only the prompt's last
        ``keep_tokens`` pieces' worth of bytes is ever tokenized."""
        text = encoded(prompt, field)
        longest_bytes = self.max_prompt_bytes // self.n_ctx
        text = utf8_tail(text, keep_tokens * longest_bytes)
        count, tokens = self.raw(text, len(text) + _SPECIALS, self.add_bos, parse_special=True)
        if count < 0:  # more tokens than bytes (a dummy prefix): -count is exact
            count, tokens = self.raw(text, -count, self.add_bos, parse_special=True)
        head = tokens[:1] if self.add_bos and tokens else []
        body = tokens[len(head) :]
        return head + body[max(0, len(body) - max(1, keep_tokens - len(head))) :]

    def raw(
        self, text: bytes, capacity: int, add_special: bool, *, parse_special: bool
    ) -> tuple[int, list[int]]:
        """llama.cpp's count (negative: the tokens ``text`` would need past
        ``capacity``) and the tokens that fit."""
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(
            self._vocab, text, len(text), buffer, capacity, add_special, parse_special
        )
        return count, list(buffer[: max(count, 0)])

    def check_room(self, tokens: list[int], field: str) -> None:
        """Raises :class:`ContextLengthExceeded` when ``tokens`` leave no room for one
        token. A ``max_tokens`` beyond the room left is a cap (:meth:`room`), as in
        Ollama and llama-server, never an error."""
        if len(tokens) >= self.n_ctx:
            raise ContextLengthExceeded(
                f"{field} ({len(tokens)} tokens) leaves no room in the context of "
                f"{self.n_ctx} tokens",
                field=field,
            )

    def room(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """How many tokens a generation after ``prompt_tokens`` may make: ``max_tokens``
        (None: no limit) capped by what is left of the context."""
        left = max(1, self.n_ctx - prompt_tokens)
        return left if max_tokens is None else min(max_tokens, left)

    @property
    def n_vocab(self) -> int:
        return int(llama_cpp.llama_vocab_n_tokens(self._vocab))

    def embedding_tokens(
        self, text: str | Sequence[int], index: int, limit: int, *, truncate: bool = False
    ) -> list[int]:
        """One embedding input's tokens: a text with the vocabulary's own BOS/EOS, taken
        literally, or token ids as they are (each checked against the vocabulary).
        ``truncate`` keeps the first ``limit`` tokens of a longer input (Ollama's
        ``truncate``). Raises :class:`InvalidRequest` (field ``input``): empty, an id
        outside the vocabulary, too long (unless ``truncate``)."""
        field = "input"
        if isinstance(text, str):
            count, tokens = self._embedding_text(text, index, limit, truncate)
        else:
            tokens = self._known_ids(text, index)
            count = len(tokens)
        if count > limit and not truncate:
            raise ContextLengthExceeded(
                f"input {index} is {count} tokens; an embedding input holds at most {limit} "
                "(--n-batch)",
                field=field,
            )
        if not tokens:
            raise InvalidRequest(f"input {index} is empty", field=field)
        return tokens[:limit]

    def _embedding_text(
        self, text: str, index: int, limit: int, truncate: bool
    ) -> tuple[int, list[int]]:
        """(the input's token count, or more than ``limit`` when it is longer; its tokens)."""
        data = encoded(text, "input")
        limit_bytes = limit * (self.max_prompt_bytes // self.n_ctx)
        if len(data) > limit_bytes:
            if not truncate:
                raise ContextLengthExceeded(
                    f"input {index} is {len(data)} bytes, more than {limit} tokens can hold",
                    field="input",
                )
            data = utf8_head(data, limit_bytes)  # the first limit tokens lie in these
        count, tokens = self.raw(data, len(data) + _SPECIALS, True, parse_special=False)
        if count < 0:  # more tokens than bytes (a dummy prefix): -count is exact
            count, tokens = self.raw(data, -count, True, parse_special=False)
        return count, tokens

    def _known_ids(self, ids: Sequence[int], index: int) -> list[int]:
        n_vocab = self.n_vocab
        for position, token in enumerate(ids):
            if not 0 <= token < n_vocab:
                raise InvalidRequest(
                    f"input {index}: token {position} is {token}, outside this model's "
                    f"vocabulary of {n_vocab} (token ids are this model's own)",
                    field="input",
                )
        return list(ids)


_SPECIALS = 8  # tokens a vocabulary may add around a text (BOS, EOS, separators)


def utf8_tail(text: bytes, limit_bytes: int) -> bytes:
    """The last ``limit_bytes`` of UTF-8 ``text`` or fewer, starting on a character."""
    if len(text) <= limit_bytes:
        return text
    start = len(text) - limit_bytes
    while start < len(text) and text[start] & 0xC0 == 0x80:  # a continuation byte
        start += 1
    return text[start:]


def utf8_head(text: bytes, limit_bytes: int) -> bytes:
    """The first ``limit_bytes`` of UTF-8 ``text`` or fewer, ending on a character."""
    if len(text) <= limit_bytes:
        return text
    end = limit_bytes
    while end > 0 and text[end] & 0xC0 == 0x80:
        end -= 1
    return text[:end]


def encoded(text: str, field: str) -> bytes:
    """Raises :class:`InvalidRequest` naming ``field`` for text that is not valid
    Unicode (a lone surrogate)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{field} is not valid Unicode", field=field) from exc


def _longest_piece_bytes(vocab: object) -> int:
    """The most bytes any one token stands for (special tokens rendered as text)."""
    size_bytes = 256
    buffer = (ctypes.c_char * size_bytes)()
    longest = 1
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        count = llama_cpp.llama_token_to_piece(vocab, token, buffer, size_bytes, 0, True)
        if count < 0:  # longer than the buffer: -count is its size
            count = -count
        longest = max(longest, count)
    return longest
