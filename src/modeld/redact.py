"""Absolute filesystem paths out of messages that leave the process.

llama.cpp and the OS put paths in their messages (``failed to open
/srv/models/x.gguf``, ``/home/runner/work/.../llama-vocab.cpp:3207: GGML_ASSERT``);
error bodies, ``/status`` and log lines at info and above carry only the last
component. Applied once where foreign text enters a modeld message.
"""

from __future__ import annotations

import re

__all__ = ["redact_paths"]

# An absolute path: "/" not inside a word or a URL, then two or more components.
_COMPONENT = r"[^\s/'\"`:;,()\[\]{}<>]"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.~:/-])/(?:{_COMPONENT}+/)+({_COMPONENT}*)")


def redact_paths(text: str) -> str:
    """``text`` with every absolute path of two or more components cut to its last one
    (``/srv/models/x.gguf`` -> ``x.gguf``; ``/proc/self/fd/7`` -> ``7``)."""
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "(dir)", text)
