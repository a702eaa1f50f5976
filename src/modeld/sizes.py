"""Sizes that several layers share, one definition each (a leaf: imports nothing)."""

from __future__ import annotations

__all__ = ["MAX_CONTEXT_TOKENS", "MIB"]

MIB = 1 << 20
"""Bytes in a MiB: every ``*_mb`` value in modeld (budget, margin, estimates) counts MiB."""

MAX_CONTEXT_TOKENS = 1 << 20
"""The largest context modeld works with: the bound on ``--n-ctx``, on a GGUF file's
``<arch>.context_length``, and on a request's ``max_tokens``."""
