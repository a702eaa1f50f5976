"""The engine tests' loop fixture: tool calling runs on both token loops too."""

from tests.engine.conftest import loop

__all__ = ["loop"]
