"""Helpers for the operator tests: log lines as records."""

from __future__ import annotations

import json

from tests.support.server import RunningServer

__all__ = ["audit_lines", "log_records"]


def log_records(server: RunningServer) -> list[dict[str, object]]:
    """The server's JSON log lines (anything else in the log is a failure)."""
    records = []
    for line in server.log().splitlines():
        if line.strip():
            record = json.loads(line)
            assert isinstance(record, dict), line
            records.append(record)
    return records


def audit_lines(server: RunningServer) -> list[dict[str, object]]:
    return [r for r in log_records(server) if r.get("audit") is True]
