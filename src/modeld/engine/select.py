"""Pick the token loop by name: the one place that maps a ``LoopKind`` to an implementation.

There is no silent fallback: asking for the C loop where it cannot run raises
:class:`~modeld.errors.TokenLoopUnavailable`, whose message says how to fix it.
"""

from __future__ import annotations

from modeld.engine.base import TokenLoop
from modeld.types import LoopKind

__all__ = ["token_loop"]


def token_loop(kind: LoopKind) -> TokenLoop:
    """The token loop for ``kind``.

    Raises TokenLoopUnavailable for ``LoopKind.C`` when the extension is missing, cannot
    bind to llama.cpp, or llama-cpp-python is not the version it was written for;
    ValueError for a name that is no LoopKind.
    """
    if LoopKind(kind) is LoopKind.C:
        from modeld.engine.cloop import CTokenLoop

        return CTokenLoop()
    from modeld.engine.pyloop import PythonTokenLoop

    return PythonTokenLoop()
