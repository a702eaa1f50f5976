"""``modeld quarantine list|clear``: the operator's view of quarantined model files.

A file is quarantined when its probe load aborted, or when a modeld process died while
llama.cpp loaded it or first generated from it (see ``modeld.scheduling.file_guard``).
It stays refused (422 ``model_invalid``) until the file changes or it is cleared here;
a cleared file is probed again on its next load. Each clear is an audit log line.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

from modeld.errors import InvalidModelId
from modeld.gguf import FileIdentity
from modeld.observability.audit import audit
from modeld.registry import check_model_id
from modeld.scheduling.file_guard import operator_name
from modeld.settings.config import Settings, add_settings_arguments
from modeld.state import FileVerdicts, StateDir, Verdict

__all__ = ["add_quarantine_parser", "pop_quarantine_options", "run_quarantine"]

QUARANTINE_ARGS = ("quarantine_action", "quarantine_model", "quarantine_all")


def add_quarantine_parser(commands: Any) -> None:
    """``commands`` is the ``modeld`` parser's subparsers object."""
    quarantine = commands.add_parser("quarantine", help="list or clear quarantined model files")
    actions = quarantine.add_subparsers(dest="quarantine_action", required=True)
    listing = actions.add_parser("list", help="the quarantined files, one per line")
    add_settings_arguments(listing)
    clear = actions.add_parser("clear", help="lift the quarantine of a model (or --all)")
    clear.add_argument("quarantine_model", nargs="?", metavar="MODEL_ID")
    clear.add_argument("--all", dest="quarantine_all", action="store_true")
    add_settings_arguments(clear)


def run_quarantine(
    settings: Settings, options: dict[str, Any], out: Callable[[str], None] = print
) -> int:
    verdicts = FileVerdicts(StateDir(settings.state_path), stamp="")
    if options["quarantine_action"] == "list":
        for verdict in verdicts.quarantined():
            out(_line(settings, verdict))
        return 0
    model_id = options.get("quarantine_model")
    if bool(model_id) == bool(options.get("quarantine_all")):
        out("modeld quarantine clear: give a MODEL_ID or --all (not both)")
        return 2
    if model_id:
        try:
            check_model_id(model_id)
        except InvalidModelId as exc:
            out(f"modeld quarantine clear: {exc.message}")
            return 2
    cleared = verdicts.clear(model_id)
    who = operator_name()
    for verdict in cleared:
        audit("quarantine_clear", verdict.model_id, who, "cleared", reason=verdict.reason)
        out(f"cleared\t{verdict.model_id}")
    if not cleared:
        audit("quarantine_clear", model_id or "*", who, "nothing_quarantined")
        out(f"modeld quarantine clear: nothing quarantined for {model_id or 'any model'}")
        return 1
    return 0


def _line(settings: Settings, verdict: Verdict) -> str:
    since = datetime.datetime.fromtimestamp(verdict.when_unix, datetime.UTC).isoformat()
    cause = verdict.source + (f"/{verdict.stage}" if verdict.stage else "")
    return "\t".join([verdict.model_id, _file_now(settings, verdict), since, cause, verdict.reason])


def _file_now(settings: Settings, verdict: Verdict) -> str:
    """``current`` while the models dir still holds that very file (it is refused),
    ``changed`` once it was rewritten or replaced (it loads again), or ``gone``."""
    try:
        info = os.stat(settings.models_path / verdict.model_id)
    except OSError:
        return "gone"
    return "current" if FileIdentity.of(info) == verdict.identity else "changed"


def pop_quarantine_options(args: dict[str, Any]) -> dict[str, Any]:
    """Take this command's own arguments out of ``args`` (the rest are settings)."""
    return {name: args.pop(name) for name in QUARANTINE_ARGS if name in args}
