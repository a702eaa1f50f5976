"""llama.cpp's own log lines go through modeld's log at a sensible level: a decode that
modeld's abort callback stopped (a client leaving, a cancel, an eviction) is a normal
cancel, not three lines at level error."""

from __future__ import annotations

import pytest

from modeld.engine.llama_load import llama_log_level

ABORT_LINES = [  # what llama.cpp writes when the abort callback stops a decode
    "graph_compute: ggml_backend_sched_graph_compute_async failed with error 1",
    "decode: failed to compute graph, compute status: 1",
    "llama_decode: failed to decode, ret = 2",
]


@pytest.mark.parametrize("line", ABORT_LINES)
def test_an_aborted_decode_is_not_an_error(line: str) -> None:
    assert llama_log_level(4, line) == "DEBUG"


def test_other_lines_keep_their_level() -> None:
    assert llama_log_level(4, "llama_decode: failed to decode, ret = -1") == "ERROR"
    assert llama_log_level(4, "decode: failed to compute graph, compute status: -1") == "ERROR"
    assert llama_log_level(3, "llama_model_load: something odd") == "WARNING"
    assert llama_log_level(2, "llama_context: n_ctx = 256") == "DEBUG"
    assert llama_log_level(1, "debug chatter") is None
    assert llama_log_level(5, ".") is None  # a continuation
