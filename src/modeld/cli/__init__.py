"""The command line: ``modeld serve`` and the server's own commands (:mod:`.main`), the
client commands that talk to a running server (:mod:`.commands` over :mod:`.client`),
and the offline quarantine commands (:mod:`.quarantine`)."""

from modeld.cli.main import main

__all__ = ["main"]
