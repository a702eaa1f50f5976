"""Every input the schema fuzzer (``nox -s "fuzz(schema)"``) found to break the converter
(``tests/fuzz/crashers/schema-*``), replayed, and its seeds, so that the property runs in
the ordinary suite while no crasher is on file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fuzz.schema_seeds import SEEDS, check_schema

CRASHERS = Path(__file__).parents[1] / "fuzz" / "crashers"
INPUTS = {f"seed-{name}": json.dumps(schema).encode() for name, schema in SEEDS.items()} | {
    path.name: path.read_bytes() for path in sorted(CRASHERS.glob("schema-*"))
}


@pytest.mark.parametrize("data", INPUTS.values(), ids=INPUTS.keys())
def test_the_converter_returns_a_bounded_grammar_or_refuses(data: bytes) -> None:
    check_schema(data)
