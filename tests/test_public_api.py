"""The public surface: a sorted __all__, and no HTTP stack for library users."""

from __future__ import annotations

import subprocess
import sys

import modeld
from modeld import errors
from modeld.api.errors import STATUS_BY_ERROR


def test_all_is_sorted_and_complete() -> None:
    assert modeld.__all__ == sorted(modeld.__all__)
    for name in modeld.__all__:
        assert hasattr(modeld, name)


def test_import_modeld_pulls_in_no_http_stack() -> None:
    code = (
        "import sys, modeld; "
        "bad = [m for m in ('starlette', 'hypercorn') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert output == ""


def test_every_error_has_a_status_and_a_unique_code() -> None:
    classes = [
        getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)
    ]
    codes = [cls.code for cls in classes if cls is not errors.Overloaded]
    assert len(codes) == len(set(codes))
    for cls in classes:
        assert cls in STATUS_BY_ERROR, cls
