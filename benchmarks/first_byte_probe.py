"""Where a short request's time goes: an instrumented modeld (marks taken with
``time.perf_counter`` at points of the request path, in the server's own process) and a
raw client in this process (``perf_counter`` is CLOCK_MONOTONIC, shared by both), so
every mark is "ms after the client sent the request".

``python -m benchmarks.first_byte_probe [--requests N] [--tokens T]`` writes a tiny
model, starts the instrumented server, sends N serial ``/infer`` streams of T tokens and
prints the median of each mark. With ``--alternate`` the server switches request by
request between the request path as it is and the one before issue 24's last change
(:func:`_old_path`; ``MODELD_PROBE_OLD`` names the parts it restores), so that host load
falls on both alike. ``--pause-ms P`` stops the server (SIGSTOP) for P ms after each
request, as the benchmark does while llama-server runs; ``MODELD_PROBE_ROWS=FILE`` keeps
every request's marks. A profiling aid, not a benchmark: the figures that count come
from ``nox -s bench_llama_server``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MARKS: list[dict[str, float]] = []
_STATE = {"old": False}


def _mark(name: str) -> None:
    """The first time ``name`` is reached in a request (``name`` ending in "<": the
    last time)."""
    if _MARKS:
        if name.endswith("<"):
            _MARKS[-1][name] = time.perf_counter()
        else:
            _MARKS[-1].setdefault(name, time.perf_counter())


def _wrap(owner: Any, attribute: str, before: str | None, after: str | None = None) -> None:
    original = getattr(owner, attribute)
    if _is_coroutine(original):

        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            if before:
                _mark(before)
            try:
                return await original(*args, **kwargs)
            finally:
                if after:
                    _mark(after)

        setattr(owner, attribute, wrapped_async)
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            _mark(before)
        try:
            return original(*args, **kwargs)
        finally:
            if after:
                _mark(after)

    setattr(owner, attribute, wrapped)


def _is_coroutine(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def _instrument(alternate: bool) -> None:
    """Marks along the request path (see the table the driver prints)."""
    from modeld.api import protocol, streaming
    from modeld.engine import cloop, llama_engine, tokens, worker
    from modeld.scheduling import admission, file_check, generation, launching, pool

    original_answer = protocol.answer

    async def answer(*args: Any, **kwargs: Any) -> Any:
        _MARKS.append({"answer": time.perf_counter()})
        if alternate:
            _STATE["old"] = len(_MARKS) % 2 == 0
            _MARKS[-1]["old"] = float(_STATE["old"])
        return await original_answer(*args, **kwargs)

    patched: Any = protocol
    patched.answer = answer
    _wrap(admission.Admission, "_start_within", "admitted")
    _wrap(pool.InstancePool, "ready_instance", "ready_instance", "instance_ready")
    _wrap(launching.Launcher, "_generation", "launch", "prepared_seen")
    _wrap(tokens.Tokenizer, "tokenize", "tokenize", "tokenized")
    _wrap(launching, "run_request", "worker_starts")
    _wrap(cloop.CTokenLoop, "_run", "c_loop_called", "c_loop_returned")
    import anyio

    wait_readable = anyio.wait_readable

    async def marked_wait_readable(fd: int) -> None:
        _mark("fd_wait")
        await wait_readable(fd)
        _mark("fd_woken")
        _mark("last_fd_woken<")

    anyio.wait_readable = marked_wait_readable  # type: ignore[assignment]
    _wrap(protocol, "start_watched", None, "start_watched_done")
    _wrap(streaming.GenerationResponse, "__call__", "response_called")
    _wrap(streaming, "_send_body", "last_body_send<", "first_body_sent")
    _wrap(generation.Generation, "_next_chunk", "last_next_chunk<")
    _wrap(streaming.GenerationResponse, "_choices", None, "choices_done")
    original_run = cloop.CTokenLoop._run

    def timed_run(*args: Any, **kwargs: Any) -> Any:
        outcome, ids = original_run(*args, **kwargs)
        if _MARKS:
            _MARKS[-1]["c_prompt_eval_ms="] = outcome.prompt_eval_ms
            _MARKS[-1]["c_eval_ms="] = outcome.eval_ms
        return outcome, ids

    cloop.CTokenLoop._run = timed_run  # type: ignore[method-assign]
    _wrap(generation.Generation, "_next_chunk", None, "chunk_framed")
    _wrap(generation.Generation, "_finish", "finish_seen")
    _wrap(worker.ThreadCall, "wait", "call_wait", "call_waited")
    _wrap(launching.Launcher, "_finished", "launcher_finished", "launcher_finished_done")
    _wrap(generation.Generation, "_settle", None, "settled")
    _wrap(llama_engine.LlamaEngine, "generate", None, "generate_returned")
    _wrap(worker.EngineWorker, "_enqueue", "submit")
    settle = worker.ThreadCall._settle

    def marked_settle(self: Any) -> None:
        if _MARKS and self._wake_fd is not None and "settle_fd_readable=" not in _MARKS[-1]:
            import select

            readable = bool(select.select([self._wake_fd], [], [], 0)[0])
            _MARKS[-1]["settle_fd_readable="] = float(readable)
            _mark("settle_cb")
        settle(self)

    call_type: Any = worker.ThreadCall
    call_type._settle = marked_settle
    _wrap(file_check.WorkerFileCheck, "run", "worker_check", "worker_checked")
    _wrap(worker.ThreadCall, "_complete", "call_complete")
    _old_path()


def _old_path() -> None:
    """Hooks through which ``--alternate`` restores the request path before the change:
    the loaded file looked up on a filesystem thread before the launch (not on the
    worker), "prepared" waking the event loop from the worker (call_soon_threadsafe)
    instead of the C loop's start, a finished call's result taken one event-loop turn
    later, and the log line and metrics of a finished generation before its last line.
    (The ring's start wake is not undone: on the old path
    it costs one empty drain more.)"""
    from modeld.engine import worker
    from modeld.scheduling import admission, launching

    admission_type: Any = admission.Admission
    start = admission_type.start

    async def old_start(self: Any, *args: Any, launch_checks_file: bool) -> Any:
        checks = launch_checks_file and not _old("stat")
        return await start(self, *args, launch_checks_file=checks)

    admission_type.start = old_start
    launcher_type: Any = launching.Launcher
    generation = launcher_type._generation

    async def old_generation(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_file = kwargs.pop("check_file", True) and not _old("stat")
        return await generation(self, *args, check_file=check_file, **kwargs)

    launcher_type._generation = old_generation
    worker_type: Any = worker.EngineWorker
    submit = worker_type.submit_signalling

    def old_submit(self: Any, fn: Any, wake_fd: int | None = None) -> Any:
        return submit(self, fn, None if _old("signal") else wake_fd)

    worker_type.submit_signalling = old_submit
    call_type: Any = worker.ThreadCall
    wait = call_type.wait

    async def old_wait(self: Any) -> Any:
        if _old("wait"):  # as before: always one event-loop turn, for the worker's notice
            await self._finished.wait()
        return await wait(self)

    call_type.wait = old_wait
    from modeld import events

    events_module: Any = events
    call_soon = events_module._call_soon
    events_module._call_soon = lambda callback: callback() if _old("soon") else call_soon(callback)


def _old(part: str) -> bool:
    """This request takes the old path for ``part`` (MODELD_PROBE_OLD: the parts restored
    on the old path, comma-separated; all by default)."""
    parts = os.environ.get("MODELD_PROBE_OLD", "stat,signal,wait,soon").split(",")
    return _STATE["old"] and part in parts


def serve(marks_path: Path, alternate: bool, flags: list[str]) -> int:
    """The server side: instrument, run ``modeld serve``, write the marks at exit."""
    import atexit

    _instrument(alternate)
    atexit.register(lambda: marks_path.write_text(json.dumps(_MARKS)))
    from modeld.cli.main import main

    return int(main(["serve", *flags]) or 0)


def _request(port: int, body: bytes) -> dict[str, float]:
    import socket

    head = (
        "POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sent = time.perf_counter()
        sock.sendall(head + body)
        marks: dict[str, float] = {"sent": sent}
        received = b""
        while data := sock.recv(65536):
            received += data
            now = time.perf_counter()
            if "first_line" not in marks and b"\n{" in received:
                marks["first_line"] = now
            if b'"done":true' in received and "done_line" not in marks:
                marks["done_line"] = now
        marks["closed"] = time.perf_counter()
    return marks


def drive(
    requests: int, tokens: int, alternate: bool, flags: list[str], pause_s: float = 0.0
) -> None:
    """Start the instrumented server, send the requests, print the medians."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import httpx
    from tests.support.server import free_port
    from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "models").mkdir()
        write_tiny_gguf(root / "models" / "tiny.gguf", TinyModelSpec(context_length=1024))
        port = free_port()
        marks_path = root / "marks.json"
        command = [
            sys.executable, "-m", "benchmarks.first_byte_probe", "serve", str(marks_path),
            "--alternate" if alternate else "--plain",
            "--models-dir", str(root / "models"), "--host", "127.0.0.1", "--port", str(port),
            "--threads", "1", "--n-ctx", "1024", *flags,
        ]  # fmt: skip
        env = {**os.environ, "XDG_STATE_HOME": str(root / "state")}
        log = (root / "modeld.log").open("wb")  # as the benchmark's servers log
        server = subprocess.Popen(
            command, cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=log
        )
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            body = json.dumps(
                {"model": "tiny.gguf", "prompt": "hello world and the", "max_tokens": tokens}
                | {"temperature": 0.0}
            ).encode()
            clients = []
            for _ in range(requests + 4):
                clients.append(_request(port, body))
                if pause_s:  # as the benchmark does: the server stopped while the other runs
                    server.send_signal(signal.SIGSTOP)
                    time.sleep(pause_s)
                    server.send_signal(signal.SIGCONT)
        finally:
            server.terminate()
            server.wait(30)
        server_marks = json.loads(marks_path.read_text())
    _report(clients[4:], server_marks[4:])
    rows_path = os.environ.get("MODELD_PROBE_ROWS")
    if rows_path:  # every request's marks, for a closer look
        rows = [{**s, **c} for c, s in zip(clients[4:], server_marks[4:], strict=True)]
        Path(rows_path).write_text(json.dumps(rows))


def _report(clients: list[dict[str, float]], servers: list[dict[str, float]]) -> None:
    """Medians of each mark, per path: a markdown table on stdout."""
    groups: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
    for client, server in zip(clients, servers, strict=True):
        merged = {**server, **client}
        groups["old" if server.get("old") else "new"].append(merged)
    names = list(dict.fromkeys(n for row in servers for n in row if n != "old"))
    names += ["first_line", "done_line", "closed"]
    shown = {k: v for k, v in groups.items() if v}
    print(f"load average {os.getloadavg()[0]:.2f}; medians, ms after the client's send")
    print("| mark | " + " | ".join(f"{k} (n={len(v)})" for k, v in shown.items()) + " |")
    print("|---|" + "---|" * len(shown))
    for name in names:
        cells = []
        for rows in shown.values():
            if name.endswith("="):  # a duration the server measured, not a mark
                values = [r[name] for r in rows if name in r]
            else:
                values = [(r[name] - r["sent"]) * 1000 for r in rows if name in r]
            cells.append(f"{statistics.median(values):.3f}" if values else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        marks_path, mode, *flags = sys.argv[2:]
        raise SystemExit(serve(Path(marks_path), mode == "--alternate", flags))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--alternate", action="store_true")
    parser.add_argument("--pause-ms", type=float, default=0.0, help="server stopped between")
    args, flags = parser.parse_known_args()
    drive(args.requests, args.tokens, args.alternate, flags, args.pause_ms / 1000)


if __name__ == "__main__":
    main()
