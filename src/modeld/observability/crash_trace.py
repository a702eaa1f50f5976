"""A native crash leaves its trace in modeld's log.

An abort or a segfault inside llama.cpp ends the process before any Python code can
run, and while a model loads llama-cpp-python points fd 2 at ``/dev/null``. Python's
``faulthandler``, given its own duplicate of stderr taken at start-up (as the JSON log
sink has), still writes the fatal signal and the Python stack of every thread when it
arrives: the worker thread's stack shows the load or generation it was in. That text is
written from inside the signal handler, so it cannot be JSON; the JSON account of the
crash (model and stage, from the stage markers) is logged by the restarted process
(``modeld.scheduling.file_guard``).

ggml's own handler for an uncaught C++ exception attaches gdb to the dying process and
prints every thread's native backtrace (hundreds of raw lines, seconds before the
process ends and its supervisor can restart it); modeld turns that off
(``GGML_NO_BACKTRACE``) unless the environment already says otherwise.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from typing import TextIO

__all__ = ["enable_crash_traces"]


def enable_crash_traces() -> TextIO:
    """Route faulthandler's output to a private duplicate of stderr; returns that file
    (faulthandler keeps a reference to it for as long as it is enabled)."""
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    trace_file = os.fdopen(os.dup(sys.stderr.fileno()), "w", closefd=True)
    faulthandler.enable(file=trace_file, all_threads=True)
    return trace_file
