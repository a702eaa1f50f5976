"""A model's tokenizer, bounded by its context: what a prompt may cost before llama.cpp's
tokenizer sees it, and whether it leaves room to generate.

Used only on the model's worker thread, like the context it sizes against.
"""

from __future__ import annotations

import ctypes

import llama_cpp

from modeld.errors import InvalidRequest

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
            raise InvalidRequest(
                f"{field} is {len(text)} bytes; no {self.n_ctx}-token context holds more "
                f"than {self.max_prompt_bytes} bytes of this model's tokens",
                field=field,
            )
        add_bos = self.add_bos if add_bos is None else add_bos
        count, tokens = self.raw(text, self.n_ctx, add_bos, parse_special=True)
        if count < 0:
            raise InvalidRequest(
                f"{field} is {-count} tokens; the context holds {self.n_ctx}", field=field
            )
        return tokens

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

    def check_room(self, tokens: list[int], max_tokens: int | None, field: str) -> None:
        """Raises :class:`InvalidRequest` when ``tokens`` plus ``max_tokens`` (None: one
        token) do not fit the context."""
        if max_tokens is None:
            if len(tokens) >= self.n_ctx:
                raise InvalidRequest(
                    f"{field} ({len(tokens)} tokens) leaves no room in the context of "
                    f"{self.n_ctx} tokens",
                    field=field,
                )
        elif len(tokens) + max_tokens > self.n_ctx:
            raise InvalidRequest(
                f"{field} ({len(tokens)} tokens) + max_tokens ({max_tokens}) "
                f"exceeds the context of {self.n_ctx} tokens",
                field="max_tokens",
            )

    def embedding_tokens(self, text: str, index: int, limit: int) -> list[int]:
        """One embedding input's tokens: the vocabulary's own BOS/EOS, its text taken
        literally. Raises :class:`InvalidRequest` (field ``input``): empty, too long."""
        field = "input"
        data = encoded(text, field)
        if len(data) > limit * self.max_prompt_bytes // self.n_ctx:
            raise InvalidRequest(
                f"input {index} is {len(data)} bytes, more than {limit} tokens can hold",
                field=field,
            )
        count, tokens = self.raw(data, limit, True, parse_special=False)
        if count < 0:
            raise InvalidRequest(
                f"input {index} is {-count} tokens; an embedding input holds at most {limit} "
                "(--n-batch)",
                field=field,
            )
        if count == 0:
            raise InvalidRequest(f"input {index} is empty", field=field)
        return tokens


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
