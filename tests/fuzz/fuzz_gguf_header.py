"""Fuzz the GGUF header validator with atheris (libFuzzer): ``nox -s fuzz``.

Every input is written to a memfd and validated through the descriptor, as a model file
is. The property: the validator returns a header or raises ``ModelInvalid``, nothing
else, within the per-input time (``-timeout``) and memory (``-rss_limit_mb``) bounds
libFuzzer enforces. An input that breaks it is saved under ``tests/fuzz/crashers/``
(``-artifact_prefix``), where ``tests/gguf/test_fuzz_crashers.py`` replays it forever.

    python tests/fuzz/fuzz_gguf_header.py -max_total_time=300 -timeout=10 \\
        -rss_limit_mb=2048 -max_len=65536 -artifact_prefix=tests/fuzz/crashers/ CORPUS SEEDS
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["modeld.gguf"]):
    from modeld.errors import ModelInvalid
    from modeld.gguf._header import read_header_from_fd

_PATH = Path("fuzz.gguf")


def validate(data: bytes) -> None:
    """The property, shared with the regression test: ModelInvalid or a header."""
    fd = os.memfd_create("fuzz.gguf", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        with contextlib.suppress(ModelInvalid):
            read_header_from_fd(fd, _PATH, "fuzz.gguf")
    finally:
        os.close(fd)


def main() -> None:
    atheris.Setup(sys.argv, validate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
