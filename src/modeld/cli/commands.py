"""``modeld status | ps | load | unload | run``: the command line as a client of a running
server (``--url``, default the local one; ``--api-key`` when the server asks for one).

Every command exits 0 on success and 1 with one line on stderr when the server is not
there or refuses; a load, and a ``run`` whose model must load first, show the load's
stages on stderr as ``/events`` reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from modeld.cli.client import ClientError, EventStream, ModeldClient, ServerError

__all__ = ["CLIENT_COMMANDS", "add_client_commands", "default_url", "run_client_command"]

CLIENT_COMMANDS = ("status", "ps", "load", "unload", "run")
URL_ENV = "MODELD_URL"
API_KEY_ENV = "MODELD_API_KEY"


def default_url(env: Mapping[str, str] | None = None) -> str:
    """``MODELD_URL``; else the address ``modeld serve`` would bind from ``MODELD_HOST``
    and ``MODELD_PORT`` (a wildcard host read as loopback); else 127.0.0.1:8080."""
    env = os.environ if env is None else env
    if env.get(URL_ENV):
        return env[URL_ENV]
    host = env.get("MODELD_HOST") or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{env.get('MODELD_PORT') or 8080}"


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--url", default=None, help=f"server URL (${URL_ENV}; default local)")
        parser.add_argument("--api-key", default=None, help=f"API key (${API_KEY_ENV})")
        return parser

    for name, help_text in (
        ("status", "the server's budget, models, queues and recent events"),
        ("ps", "the loaded models"),
    ):
        command(name, help_text).add_argument("--json", action="store_true", help="raw JSON")
    load = command("load", "load (and warm) a model now, showing its progress")
    load.add_argument("model")
    load.add_argument("--pin", action="store_true", help="keep it from being evicted")
    command("unload", "unload a model (its running request ends 'evicted')").add_argument("model")
    run = command("run", "stream a generation to the terminal")
    run.add_argument("model")
    run.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    run.add_argument("--max-tokens", type=int, default=None)
    run.add_argument("--temperature", type=float, default=None)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--verbose", action="store_true", help="timings and speed on stderr")


def run_client_command(
    command: str,
    args: Mapping[str, Any],
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    url = args.get("url") or default_url()
    try:
        client = ModeldClient(url, args.get("api_key") or os.environ.get(API_KEY_ENV) or None)
        return _COMMANDS[command](client, args, out, err)
    except ClientError as exc:
        print(f"modeld: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        print(file=err)
        return 130


# --------------------------------------------------------------------- commands


def _status(client: ModeldClient, args: Mapping[str, Any], out: TextIO, err: TextIO) -> int:
    status = client.status()
    if args.get("json"):
        print(json.dumps(status, indent=2), file=out)
        return 0
    free_mb = max(0.0, status["budget_mb"] - status["margin_mb"] - status["used_est_mb"])
    print(
        f"modeld {client.url} · up {_duration(status['uptime_seconds'])} · "
        f"{status['token_loop']} loop · {'accepting' if status['accepting'] else 'shutting down'}",
        file=out,
    )
    print(
        f"budget    {_mib(status['used_est_mb'])} used · {_mib(status['margin_mb'])} margin · "
        f"{_mib(free_mb)} free of {_mib(status['budget_mb'])} ({status['memory_probe']})",
        file=out,
    )
    print(f"requests  {status['running']} running · {status['admitted']} admitted", file=out)
    print(file=out)
    _print_models(status, out, include_unloaded=True)
    events = status.get("recent_events", [])[-8:]
    if events:
        print("\nrecent events", file=out)
        _table(out, [[_clock(e["time_unix"]), *_event_text(e), ""] for e in reversed(events)])
    return 0


def _ps(client: ModeldClient, args: Mapping[str, Any], out: TextIO, err: TextIO) -> int:
    status = client.status()
    if args.get("json"):
        print(json.dumps(status["instances"], indent=2), file=out)
        return 0
    _print_models(status, out, include_unloaded=False)
    return 0


def _load(client: ModeldClient, args: Mapping[str, Any], out: TextIO, err: TextIO) -> int:
    model = str(args["model"])
    with LoadProgress(client, model, err):
        instance = client.load(model, pin=True if args.get("pin") else None)
    pinned = ", pinned" if instance.get("pinned") else ""
    print(f"{model} ready ({_mib(instance['est_vram_mb'])}{pinned})", file=out)
    return 0


def _unload(client: ModeldClient, args: Mapping[str, Any], out: TextIO, err: TextIO) -> int:
    model = str(args["model"])
    client.unload(model)
    print(f"{model} unloaded", file=out)
    return 0


def _run(client: ModeldClient, args: Mapping[str, Any], out: TextIO, err: TextIO) -> int:
    prompt = args.get("prompt")
    if prompt is None:
        prompt = sys.stdin.read()
    body: dict[str, Any] = {"model": args["model"], "prompt": prompt}
    for name in ("max_tokens", "temperature", "seed"):
        if args.get(name) is not None:
            body[name] = args[name]
    terminal: dict[str, Any] = {}
    progress = LoadProgress(client, str(args["model"]), err)
    with progress:
        records = client.infer(body)
        try:
            for record in records:
                if record.get("done"):
                    terminal = record
                    break
                progress.stop()  # text flows: the model is loaded
                out.write(record["text"])
                out.flush()
        finally:
            records.close()  # leaving early closes the connection: the server cancels
    out.write("\n")
    out.flush()
    if not terminal:
        raise ClientError(
            "the connection closed before the generation's terminal line (did the server stop?)"
        )
    if args.get("verbose"):
        _print_metrics(terminal, err)
    if terminal["done_reason"] not in {"stop", "length"}:
        error = terminal.get("error") or {}
        detail = f": {error.get('message')}" if error else ""
        print(f"modeld: the generation ended {terminal['done_reason']}{detail}", file=err)
        return 1
    return 0


_COMMANDS: dict[str, Callable[[ModeldClient, Mapping[str, Any], TextIO, TextIO], int]] = {
    "status": _status,
    "ps": _ps,
    "load": _load,
    "unload": _unload,
    "run": _run,
}


# --------------------------------------------------------------------- load progress


class LoadProgress:
    """Shows a model's load stages on ``err`` while the block runs, from ``/events`` read
    on a thread; nothing is shown when no load happens. Progress is a courtesy: if the
    event stream cannot be opened the block runs without it."""

    def __init__(self, client: ModeldClient, model: str, err: TextIO) -> None:
        self._client = client
        self._model = model
        self._err = err
        self._tty = err.isatty()
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None
        self._shown = False
        self._lock = threading.Lock()

    def __enter__(self) -> LoadProgress:
        try:
            self._stream = self._client.events()
        except ServerError:
            return self  # e.g. /events refused: the command itself will say what is wrong
        self._thread = threading.Thread(target=self._follow, name="modeld-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            if self._shown and self._tty:
                self._err.write("\n")
                self._err.flush()
            self._shown = False

    def _follow(self) -> None:
        assert self._stream is not None
        try:
            for kind, data in self._stream:
                if data.get("model") == self._model:
                    text = _progress_text(kind, data)
                    if text:
                        self._show(text)
        except (ClientError, OSError, ValueError):
            pass  # the stream broke: the command's own call reports what matters

    def _show(self, text: str) -> None:
        with self._lock:
            if self._tty:
                self._err.write(f"\r\x1b[K{text}")
            else:
                self._err.write(text + "\n")
            self._err.flush()
            self._shown = True


def _progress_text(kind: str, data: Mapping[str, Any]) -> str | None:
    model = data["model"]
    if kind == "model_load_started":
        return f"loading {model} …"
    if kind == "model_loading_progress":
        stage = str(data["stage"]).replace("_", " ")
        return f"loading {model}: {stage} ({float(data['progress']) * 100:.0f}%)"
    if kind == "model_ready":
        return f"loaded {model} in {data['load_ms']} ms"
    if kind == "model_error":
        return f"loading {model} failed: {data['error']}"
    return None


# --------------------------------------------------------------------- rendering


def _print_models(status: Mapping[str, Any], out: TextIO, *, include_unloaded: bool) -> None:
    rows = [_model_row(i, status["server_time_unix"]) for i in status["instances"]]
    if include_unloaded:
        loaded = {i["model_id"] for i in status["instances"]}
        for counters in status["counters"]:
            if counters["model_id"] not in loaded:
                rows.append(
                    [counters["model_id"], "unloaded", "-", "0", "0", "-", "-",
                     str(counters["loads_total"]), str(counters["evictions_total"]), ""]
                )  # fmt: skip
    if not rows:
        print("no models loaded", file=out)
        return
    header = ["MODEL", "STATE", "MEMORY", "QUEUE", "IN FLIGHT", "TOKENS/S", "IDLE", "LOADS",
              "EVICTIONS", "PINNED"]  # fmt: skip
    _table(out, [header, *sorted(rows)])


def _model_row(instance: Mapping[str, Any], now_unix: float) -> list[str]:
    state = instance["state"]
    if state == "loading" and instance.get("load_stage"):
        state = f"loading ({str(instance['load_stage']).replace('_', ' ')})"
    elif state == "error" and instance["retry_in_seconds"] > 0:
        state = f"cooling down (retry in {_duration(instance['retry_in_seconds'])})"
    idle = "-"
    if instance["state"] == "ready":
        idle = "busy" if instance["inflight"] else _duration(now_unix - instance["last_used"])
    rate = instance.get("last_tokens_per_second") or 0
    return [
        instance["model_id"],
        state,
        _mib(instance["est_vram_mb"]) if instance["est_vram_mb"] else "-",
        str(instance["queue_len"]),
        str(instance["inflight"]),
        f"{rate:.1f}" if rate else "-",
        idle,
        str(instance["loads_total"]),
        str(instance["evictions_total"]),
        "yes" if instance["pinned"] else "",
    ]


def _event_text(event: Mapping[str, Any]) -> list[str]:
    details = event.get("details", {})
    kind = event["kind"]
    if kind == "model_ready":
        return ["ready", event["model"], f"loaded in {details.get('load_ms')} ms"]
    if kind == "model_evicted":
        cause = details.get("cause")
        why = {
            "budget": f"to make room for {details.get('for_model')}",
            "unload": "unloaded on request",
            "file_changed": "its file changed",
        }.get(str(cause), str(cause or details.get("reason")))
        return ["evicted", event["model"], why]
    if kind == "model_error":
        return ["error", event["model"], str(details.get("error", ""))]
    if kind == "model_load_started":
        return ["load started", event["model"], ""]
    return [kind, event["model"], ""]


def _print_metrics(terminal: Mapping[str, Any], err: TextIO) -> None:
    m = terminal["metrics"]
    print(
        f"done: {terminal['done_reason']} · {m['prompt_tokens']} prompt tokens · "
        f"{m['completion_tokens']} tokens at {m['tokens_per_second']:.1f} tokens/s · "
        f"first token {m['ttft_ms']:.0f} ms (queue {m['queue_ms']:.0f} ms, load "
        f"{m['load_ms']:.0f} ms) · total {m['total_ms']:.0f} ms",
        file=err,
    )


def _table(out: TextIO, rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def _mib(value: float) -> str:
    return f"{value:.0f} MiB" if value >= 100 else f"{value:.1f} MiB"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _clock(time_unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(time_unix))
