"""Checks of the ``[models."<id>"]`` tables that need more than the config file: the
models dir (every id names a file there) and the engine (a template name is one llama.cpp
knows, a template file exists and compiles). Run at start (the CLI before serving, the
manager when entered); anything wrong is a :class:`ConfigError` naming the table.
"""

from __future__ import annotations

from collections.abc import Collection

from modeld.chat import ChatTemplate
from modeld.chat.template import read_template_file
from modeld.engine.chat_format import builtin_chat_templates
from modeld.errors import ChatTemplateError, ConfigError
from modeld.settings.config import Settings
from modeld.settings.per_model import template_file

__all__ = ["check_model_settings"]


def check_model_settings(settings: Settings, known_ids: Collection[str]) -> None:
    """Raises :class:`ConfigError` for the first bad table. Reads template files: call
    it off the event loop."""
    for model_id, own in settings.models.items():
        where = f'[models."{model_id}"]'
        if model_id not in known_ids:
            raise ConfigError(f"{where}: no such model in {settings.models_path}", field="models")
        if own.chat_template is None:
            continue
        path = template_file(own.chat_template)
        if path is None:
            if own.chat_template not in builtin_chat_templates():
                names = ", ".join(sorted(builtin_chat_templates()))
                raise ConfigError(
                    f"{where}: chat_template {own.chat_template!r} is neither a llama.cpp "
                    f"built-in template ({names}) nor a Jinja file (a path, or a name "
                    "ending in .jinja)",
                    field="models",
                )
            continue
        try:
            ChatTemplate(read_template_file(path), where=str(path))
        except ChatTemplateError as exc:
            raise ConfigError(f"{where}: {exc.message}", field="models") from None
