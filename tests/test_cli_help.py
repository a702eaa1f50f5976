"""``modeld --help`` says what the commands do, in plain text (no docstring markup, no
module paths)."""

from __future__ import annotations

import pytest

from modeld.cli.main import main


def test_help_describes_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text
    assert "modeld.cli" not in text
    for command in ("serve", "models", "status", "load", "unload", "run", "quarantine"):
        assert f"modeld {command}" in text or f"| {command}" in text, command
