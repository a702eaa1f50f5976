"""Chat templates: conversations turned into the prompt text a model was trained on.

Protocol-neutral (the OpenAI and Ollama adapters and the library all come here through
the engine); Jinja templates render only in :mod:`modeld.chat.sandbox`.
"""

from modeld.chat.sandbox import TemplateRefused, TemplateSandbox, render_bounded
from modeld.chat.template import MAX_TEMPLATE_CHARS, ChatTemplate

__all__ = [
    "MAX_TEMPLATE_CHARS",
    "ChatTemplate",
    "TemplateRefused",
    "TemplateSandbox",
    "render_bounded",
]
