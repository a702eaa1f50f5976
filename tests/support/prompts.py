"""Deterministic prose for tests and benchmarks that need long prompts."""

from __future__ import annotations

__all__ = ["FOLLOW_UP", "long_prompt"]

_SUBJECTS = ["The keeper", "A fisherman", "The old clerk", "Her brother", "The ferryman"]
_VERBS = ["mended", "counted", "painted", "carried", "watched"]
_OBJECTS = ["the nets", "the lamps", "the boats", "the letters", "the gulls"]
_PLACES = ["by the harbour", "on the cliff", "before the storm", "after supper", "at dawn"]

FOLLOW_UP = " What did the keeper find in the bottle on the last morning?"


def long_prompt(sentences: int = 31) -> str:
    """About fourteen Gemma tokens a sentence: the default is a ~450-token prompt."""
    lines = []
    for i in range(sentences):
        lines.append(
            f"{_SUBJECTS[i % 5]} {_VERBS[(i // 5) % 5]} {_OBJECTS[(i // 2) % 5]} "
            f"{_PLACES[(i // 3) % 5]} on day {i + 1}."
        )
    return "Here is a log from a lighthouse. " + " ".join(lines)
