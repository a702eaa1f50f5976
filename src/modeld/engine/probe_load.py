"""A probe load: the model loaded, tokenized and decoded once in a throwaway process.

modeld keeps every model in one process, so one native abort inside llama.cpp takes all
of them down. The validator refuses the files it knows to be hostile; a probe load
catches the ones it does not know: before a file identity (device, inode, size, mtime)
is loaded in-process for the first time, a child process loads it with a small context
on the CPU, tokenizes :data:`PROBE_TEXT` (ASCII, accents, CJK, emoji, control characters:
byte fallback and normalisation paths), renders every token (the engine does that
itself when it sizes the prompt limit) and decodes a few tokens. The child gets the
very descriptor the parent validated (``pass_fds``), so it probes the same inode.

Outcomes: ``passed``; ``aborted`` (killed by a signal other than SIGKILL: the file is
bad); ``refused`` (llama.cpp refused the file cleanly); ``killed`` (SIGKILL, most likely
the OOM killer: says nothing about the file); ``timed_out``. The child reports each
stage on stdout as it enters it, so an abort is attributed to a stage; its stderr (C
level only: Python-level prints are discarded) carries llama.cpp's last words.

Run as ``python -c <_CHILD> --fd N ...`` by :func:`probe_load`: not ``-m``, since
``import modeld`` imports this module before runpy would run it, and runpy's warning
about that would stand in the child's stderr ahead of llama.cpp's last words.
"""

from __future__ import annotations

import argparse
import enum
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import orjson

from modeld.redact import redact_paths
from modeld.types import LoopKind

__all__ = ["PROBE_TEXT", "ProbeOutcome", "ProbeStatus", "main", "probe_load"]

PROBE_TEXT = (
    "Hello, world! 0123456789 <s> </s> [INST]\n\t"
    "café naïve Straße ¿¡ Ελληνικά русский 日本語 한국어 עברית العربية हिन्दी "
    "🦙🚀👍🏽 ∑∫√ €£¥ e\u0301 \u200d\ufeff \x7f"
)
PROBE_N_CTX = 256
PROBE_N_BATCH = 64
PROBE_DECODE_TOKENS = 16
_MAX_DETAIL_CHARS = 400
_CHILD = "import sys; from modeld.engine.probe_load import main; sys.exit(main())"


class ProbeStatus(enum.StrEnum):
    PASSED = "passed"
    ABORTED = "aborted"
    REFUSED = "refused"
    KILLED = "killed"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    status: ProbeStatus
    stage: str  # the last stage the child entered: "start", "load", "tokenize", "decode"
    detail: str  # what went wrong, from llama.cpp or the OS, paths redacted
    duration_s: float = 0.0


async def probe_load(
    fd: int,
    label: str,
    *,
    n_ctx_train: int,
    threads: int,
    token_loop: LoopKind,
    timeout_s: float,
) -> ProbeOutcome:
    """Probe-load the file open on ``fd`` (``label`` names it in messages).

    Cancelling the wait kills the child. Raises nothing for anything the child does.
    """
    command = [
        sys.executable, "-c", _CHILD, "--fd", str(fd), "--label", label,
        "--n-ctx-train", str(n_ctx_train), "--threads", str(threads),
        "--token-loop", str(token_loop),
    ]  # fmt: skip
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # no gdb attach on an abort
    started_s = anyio.current_time()
    try:
        with anyio.fail_after(timeout_s):
            done = await anyio.run_process(command, pass_fds=(fd,), env=env, check=False)
    except TimeoutError:
        return ProbeOutcome(
            ProbeStatus.TIMED_OUT, "unknown", f"did not finish within {timeout_s:g} s"
        )
    duration_s = anyio.current_time() - started_s
    stage, error = _read_reports(done.stdout)
    returncode = done.returncode
    if returncode == 0 and stage == "passed":
        return ProbeOutcome(ProbeStatus.PASSED, stage, "", duration_s)
    if returncode < 0:
        name = _signal_name(-returncode)
        status = ProbeStatus.KILLED if -returncode == signal.SIGKILL else ProbeStatus.ABORTED
        last_words = _last_words(done.stderr)
        detail = f"killed by {name}" + (f": {last_words}" if last_words else "")
        return ProbeOutcome(status, stage, detail, duration_s)
    detail = error or _last_words(done.stderr) or f"exit status {returncode}"
    return ProbeOutcome(ProbeStatus.REFUSED, stage, detail, duration_s)


def _read_reports(stdout: bytes) -> tuple[str, str]:
    stage, error = "start", ""
    for line in stdout.splitlines()[-64:]:
        try:
            report = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(report, dict):
            stage = str(report.get("stage", stage))
            error = str(report.get("error", error))
    return stage, redact_paths(error)[:_MAX_DETAIL_CHARS]


def _last_words(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line][-3:]
    return redact_paths(" | ".join(lines))[-_MAX_DETAIL_CHARS:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ----------------------------------------------------------------------- the child


def _report(**fields: str) -> None:
    sys.stdout.buffer.write(orjson.dumps(fields) + b"\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modeld.engine.probe_load")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--n-ctx-train", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--token-loop", default=str(LoopKind.PYTHON))
    args = parser.parse_args(argv)
    # Python-level chatter (llama-cpp-python's verbose prints) goes nowhere; C-level
    # writes to fd 2 (an abort's message) still reach the parent.
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    from loguru import logger

    logger.remove()
    from modeld.engine.base import RING_CAPACITY_BYTES
    from modeld.engine.llama_engine import EngineSettings, LlamaEngine
    from modeld.engine.select import token_loop
    from modeld.errors import ModeldError
    from modeld.types import SamplingParams

    settings = EngineSettings(
        n_ctx=min(PROBE_N_CTX, args.n_ctx_train),
        n_batch=PROBE_N_BATCH,
        n_threads=args.threads,
        n_gpu_layers=0,
        use_mmap=True,
        verbose=True,  # or llama-cpp-python sends fd 2 to /dev/null during the load
    )
    try:
        _report(stage="load")
        engine = LlamaEngine(
            f"/proc/self/fd/{args.fd}",
            settings,
            token_loop(LoopKind(args.token_loop)),
            args.n_ctx_train,
            label=args.label,
        )
        _report(stage="tokenize")
        tokens = engine.tokenize(PROBE_TEXT)
        _report(stage="decode")
        ring = engine.new_ring(RING_CAPACITY_BYTES)
        params = SamplingParams(max_tokens=1, temperature=0.0)
        outcome = engine.generate(ring, tokens[:PROBE_DECODE_TOKENS], params)
        ring.close()
        if outcome.error:
            _report(stage="decode", error=outcome.error)
            return 3
        engine.close()
    except ModeldError as exc:
        _report(error=exc.message)
        return 3
    _report(stage="passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
