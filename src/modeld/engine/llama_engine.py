"""The adapter to llama-cpp-python: one model + context, used only from its worker thread.

llama.cpp failures are translated here, once, into modeld errors (``raise ... from``).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
from loguru import logger

from modeld.engine.base import LoopOutcome, TokenLoop, TokenRing
from modeld.errors import InvalidRequest, ModelLoadFailed
from modeld.types import SamplingParams

__all__ = ["EngineSettings", "LlamaEngine"]

# ggml_log_level in the llama.cpp this release vendors (ggml.h): 1 debug, 2 info, 3 warn,
# 4 error, 5 continuation. (llama-cpp-python's own mapping still follows an older enum.)
_LLAMA_LOG_LEVELS = {3: "WARNING", 4: "ERROR"}


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's warnings and errors as modeld log records instead of raw stderr text;
    its info and debug chatter (hundreds of lines per load) is dropped at the source."""
    name = _LLAMA_LOG_LEVELS.get(level)
    message = text.decode("utf-8", "replace").strip() if name else ""
    if name and message:
        # "{}": llama.cpp text may hold braces, which loguru would take as a format
        logger.log(name, "{}", message, source="llama.cpp")


llama_cpp.llama_log_set(_route_llama_log, ctypes.c_void_p(0))


@dataclass(frozen=True, slots=True)
class EngineSettings:
    n_ctx: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int
    use_mmap: bool = True


class LlamaEngine:
    """Owns one ``llama_cpp.Llama``. Every method must run on the owning worker thread."""

    def __init__(
        self, path: Path, settings: EngineSettings, loop: TokenLoop, n_ctx_train: int
    ) -> None:
        self._loop = loop
        # n_ctx is never 0 ("auto"): metadata must not size an allocation.
        self.n_ctx = max(16, min(settings.n_ctx, n_ctx_train))
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self.n_ctx,
                n_batch=min(settings.n_batch, self.n_ctx),
                n_ubatch=min(settings.n_batch, self.n_ctx),
                n_threads=settings.n_threads,
                n_threads_batch=settings.n_threads,
                n_gpu_layers=settings.n_gpu_layers,
                use_mmap=settings.use_mmap,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadFailed(f"llama.cpp could not load {path.name}: {exc}") from exc
        self._vocab = self._llama._model.vocab
        self._closed = False

    @property
    def model_size_bytes(self) -> int:
        return int(llama_cpp.llama_model_size(self._llama.model))

    def tokenize(self, prompt: str) -> list[int]:
        """Tokens of ``prompt`` through a buffer bounded by n_ctx (never by model metadata).

        Raises :class:`InvalidRequest` when the prompt cannot be encoded or is too long.
        """
        try:
            text = prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest("prompt is not valid Unicode", field="prompt") from exc
        capacity = self.n_ctx
        buffer = (llama_cpp.llama_token * capacity)()
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        count = llama_cpp.llama_tokenize(
            self._vocab, text, len(text), buffer, capacity, add_bos, True
        )
        if count < 0:
            raise InvalidRequest(
                f"prompt is {-count} tokens; the context holds {self.n_ctx}", field="prompt"
            )
        return list(buffer[:count])

    def generate(
        self, ring: TokenRing, prompt_tokens: Sequence[int], params: SamplingParams
    ) -> LoopOutcome:
        return self._loop.run(self._llama, ring, prompt_tokens, params)

    def warm_up(self) -> None:
        """One token through the whole graph, so the first request pays no first-use cost."""
        ring = self._loop.new_ring(4096)
        try:
            tokens = self.tokenize("warm up") or [0]
            outcome = self.generate(ring, tokens, SamplingParams(max_tokens=1, temperature=0.0))
        finally:
            ring.finish()
            ring.close()
        if outcome.error:
            raise ModelLoadFailed(f"warm-up generation failed: {outcome.error}")

    def close(self) -> None:
        """Free the context and the weights now, not at garbage collection."""
        if self._closed:
            return
        self._closed = True
        self._llama.close()
        del self._llama
        _malloc_trim()


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS so RSS reflects what is really held."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
