"""Fuzz the JSON-schema-to-GBNF converter with atheris (libFuzzer): ``nox -s "fuzz(schema)"``.

Every input is read as JSON text (libFuzzer mutates the seed schemas of
``tests/fuzz/schema_seeds.py``). The property: :func:`schema_grammar` returns a grammar
within the budget (:data:`~modeld.grammar.DEFAULT_LIMITS`) or raises ``InvalidRequest``,
nothing else, within libFuzzer's per-input time (``-timeout``) and memory
(``-rss_limit_mb``). An input that breaks it is saved under ``tests/fuzz/crashers/`` with
the prefix ``schema-``, where ``tests/grammar/test_fuzz_crashers.py`` replays it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["modeld.grammar"]):
    from tests.fuzz.schema_seeds import check_schema


def main() -> None:
    atheris.Setup(sys.argv, check_schema)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
