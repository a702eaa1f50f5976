"""``modeld status | ps | load | unload | run`` against real servers, run as the user runs
them (a subprocess of the installed command line): tables that agree with ``/status``,
load progress, streamed text, and a clear message with a non-zero exit when the server
is not there, refuses, goes away, or the user presses Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from modeld.cli.commands import default_url
from tests.support.http import GEMMA, GEMMA_FLAGS, ServerFactory, poll
from tests.support.server import RunningServer, free_port

MODELD = [sys.executable, "-m", "modeld.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    return {**env, **extra}


def cli(*args: str, server: RunningServer | None = None, stdin: str = "", **env: str):  # type: ignore[no-untyped-def]
    url = ["--url", server.base_url] if server else []
    return subprocess.run(
        [*MODELD, *args, *url], input=stdin, capture_output=True, text=True, timeout=120,
        env=_env(**env),
    )  # fmt: skip


def rows(table: str) -> dict[str, dict[str, str]]:
    """A table printed by ``status``/``ps``: model -> {column: cell}."""
    lines = [line for line in table.splitlines() if line.strip()]
    header = lines[0]
    starts = [header.index(name) for name in header.split("  ") if name.strip()]
    names = [header[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
    parsed = {}
    for line in lines[1:]:
        cells = [line[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
        parsed[cells[0]] = dict(zip(names, cells, strict=True))
    return parsed


def test_status_and_ps_agree_with_the_server(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        assert client.post("/models/tiny-a.gguf/load", json={"pin": True}).status_code == 200
        assert client.post("/infer", json={"model": "tiny-b.gguf", "prompt": "hi"}).is_success
        assert client.delete("/models/tiny-b.gguf/instance").status_code == 200
        status = client.get("/status").json()
    ps = cli("ps", server=server)
    assert ps.returncode == 0, ps.stderr
    table = rows(ps.stdout)
    assert set(table) == {"tiny-a.gguf"}  # loaded models only
    a = table["tiny-a.gguf"]
    (instance,) = status["instances"]
    assert a["STATE"] == "ready"
    assert a["MEMORY"] == f"{instance['est_vram_mb']:.1f} MiB"
    assert (a["QUEUE"], a["IN FLIGHT"], a["PINNED"], a["LOADS"]) == ("0", "0", "yes", "1")

    shown = cli("status", server=server)
    assert shown.returncode == 0, shown.stderr
    head, models, events = shown.stdout.split("\n\n")
    assert f"modeld {server.base_url}" in head
    assert f"of {status['budget_mb']} MiB" in head
    assert "0 running · 0 admitted" in head
    table = rows(models)
    assert table["tiny-b.gguf"]["STATE"] == "unloaded"  # the history of a gone model
    assert table["tiny-b.gguf"]["EVICTIONS"] == "0"  # an unload on request is not one
    assert table["tiny-b.gguf"]["TOKENS/S"] == "-"
    assert table["tiny-a.gguf"]["STATE"] == "ready"
    assert events.splitlines()[0] == "recent events"
    assert "unloaded on request" in events.splitlines()[1]

    as_json = cli("status", "--json", server=server)
    assert json.loads(as_json.stdout)["instances"][0]["model_id"] == "tiny-a.gguf"
    assert json.loads(cli("ps", "--json", server=server).stdout)[0]["pinned"] is True


def test_load_shows_progress_and_unload_says_what_happened(
    start_server: ServerFactory, models_dir: Path, tmp_path: Path
) -> None:
    # A fresh state dir, so the file has never passed a probe: every stage shows.
    server = start_server(models_dir, "--state-dir", str(tmp_path / "state"))
    loaded = cli("load", "tiny-c.gguf", "--pin", server=server)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("tiny-c.gguf ready (")
    assert loaded.stdout.rstrip().endswith("MiB, pinned)")
    progress = loaded.stderr.splitlines()
    assert progress[0] == "loading tiny-c.gguf …"
    assert progress[1:5] == [
        "loading tiny-c.gguf: validated (10%)",
        "loading tiny-c.gguf: probe loaded (15%)",
        "loading tiny-c.gguf: memory reserved (20%)",
        "loading tiny-c.gguf: weights loaded (90%)",
    ]
    assert progress[5].startswith("loaded tiny-c.gguf in ")
    with server.client() as client:
        assert client.get("/status").json()["instances"][0]["pinned"] is True

    again = cli("load", "tiny-c.gguf", server=server)  # already loaded: nothing to show
    assert (again.returncode, again.stderr) == (0, "")

    unloaded = cli("unload", "tiny-c.gguf", server=server)
    assert (unloaded.returncode, unloaded.stdout) == (0, "tiny-c.gguf unloaded\n")
    twice = cli("unload", "tiny-c.gguf", server=server)
    assert twice.returncode == 1
    assert twice.stderr == (
        "modeld: model 'tiny-c.gguf' is not loaded (model_not_found, HTTP 404)\n"
    )
    unknown = cli("load", "nope.gguf", server=server)
    assert unknown.returncode == 1
    assert "(model_not_found, HTTP 404)" in unknown.stderr
    bad = cli("load", "../etc/passwd", server=server)
    assert bad.returncode == 1
    assert "HTTP 4" in bad.stderr


def test_run_streams_the_same_text_as_the_api(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    run = cli("run", "tiny-b.gguf", "Hello there", "--max-tokens", "12", "--temperature", "0",
              "--verbose", server=server)  # fmt: skip
    assert run.returncode == 0, run.stderr
    with server.client() as client:
        body = {"model": "tiny-b.gguf", "prompt": "Hello there", "max_tokens": 12,
                "temperature": 0, "stream": False}  # fmt: skip
        expected = client.post("/infer", json=body).json()
    assert run.stdout == expected["text"] + "\n"
    assert "loaded tiny-b.gguf in" in run.stderr  # it had to load first
    assert "done: length · " in run.stderr
    assert "12 tokens at" in run.stderr

    from_stdin = cli("run", "tiny-b.gguf", "--max-tokens", "12", "--temperature", "0",
                     server=server, stdin="Hello there")  # fmt: skip
    assert (from_stdin.returncode, from_stdin.stdout) == (0, run.stdout)
    assert from_stdin.stderr == ""  # loaded already: no progress, no metrics

    # max_tokens past the context is a cap now (README); a temperature out of bounds is not
    too_hot = cli("run", "tiny-b.gguf", "hi", "--temperature", "5", server=server)
    assert too_hot.returncode == 1
    assert "(bad_request, HTTP 400)" in too_hot.stderr


def test_no_server_is_a_clear_message_and_exit_1(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["ps"], ["load", "m.gguf"], ["unload", "m.gguf"],
                 ["run", "m.gguf", "hi"]):  # fmt: skip
        result = cli(*args, "--url", nobody)
        assert result.returncode == 1, args
        assert result.stdout == ""
        assert result.stderr == (
            f"modeld: cannot reach modeld at {nobody}: connection refused "
            "(is `modeld serve` running there?)\n"
        )
    from_env = cli("status", MODELD_URL=nobody)
    assert nobody in from_env.stderr
    assert from_env.returncode == 1
    not_http = cli("status", "--url", "ftp://127.0.0.1:1")
    assert not_http.returncode == 1
    assert "not an http(s) URL" in not_http.stderr
    no_host = cli("status", "--url", "http://no-such-host.invalid:8080")
    assert no_host.returncode == 1
    assert "unknown host" in no_host.stderr


def test_the_default_url_follows_the_server_settings() -> None:
    assert default_url({}) == "http://127.0.0.1:8080"
    assert default_url({"MODELD_PORT": "9000"}) == "http://127.0.0.1:9000"
    assert default_url({"MODELD_HOST": "0.0.0.0", "MODELD_PORT": "1"}) == "http://127.0.0.1:1"
    assert default_url({"MODELD_HOST": "::"}) == "http://[::1]:8080"
    assert default_url({"MODELD_URL": "http://x:1", "MODELD_PORT": "2"}) == "http://x:1"


class KeyCheckingServer(ThreadingHTTPServer):
    """Stands in for a server with ``--api-key`` (issue 11 builds it): records what each
    request sent and answers 401 unless the key is right, as that server will."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.seen: list[dict[str, str]] = []
        super().__init__(("127.0.0.1", 0), _KeyCheckingHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _KeyCheckingHandler(BaseHTTPRequestHandler):
    server: KeyCheckingServer

    def do_GET(self) -> None:
        self.server.seen.append(dict(self.headers.items()))
        if self.headers.get("Authorization") == f"Bearer {self.server.key}":
            status, body = 200, {"instances": []}
        else:
            status = 401
            body = {"error": {"code": "unauthorized", "message": "a valid API key is needed"}}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def test_the_api_key_travels_as_a_bearer_header() -> None:
    with KeyCheckingServer("s3cret") as keyed:
        serving = threading.Thread(target=keyed.serve_forever, daemon=True)
        serving.start()
        try:
            from_env = cli("ps", "--json", "--url", keyed.url, MODELD_API_KEY="s3cret")
            assert (from_env.returncode, from_env.stdout) == (0, "[]\n")
            from_flag = cli("ps", "--json", "--url", keyed.url, "--api-key", "s3cret")
            assert from_flag.returncode == 0
            wrong = cli("ps", "--url", keyed.url, "--api-key", "s3creT")
            assert wrong.returncode == 1
            assert wrong.stderr == ("modeld: a valid API key is needed (unauthorized, HTTP 401)\n")
            missing = cli("ps", "--url", keyed.url)
            assert missing.returncode == 1
        finally:
            keyed.shutdown()
    sent = [headers.get("Authorization") for headers in keyed.seen]
    assert sent == ["Bearer s3cret", "Bearer s3cret", "Bearer s3creT", None]


def _run_story(server: RunningServer) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*MODELD, "run", GEMMA, "Tell a long story.", "--max-tokens", "900", "--url",
         server.base_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_during_run_cancels_the_generation(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    server = start_server(gemma_dir, *GEMMA_FLAGS)
    with _run_story(server) as process, server.client() as client:
        assert process.stdout is not None
        try:
            assert process.stdout.read(1)  # text is flowing
            assert client.get("/status").json()["running"] == 1
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 130
            poll(lambda: client.get("/status").json()["running"], lambda n: n == 0)
        finally:
            if process.poll() is None:
                process.kill()
    finished = [line for line in server.log().splitlines() if "generation finished" in line]
    assert '"done_reason":"cancelled"' in finished[-1]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_server_that_goes_away_mid_run_is_reported(
    start_server: ServerFactory, gemma_dir: Path, how: str, tmp_path: Path
) -> None:
    # A state dir of its own: a SIGKILL inside Gemma's first generation leaves a stage
    # marker, and the next modeld to start on the shared dir would quarantine Gemma.
    state = ("--state-dir", str(tmp_path / "state"))
    server = start_server(gemma_dir, *GEMMA_FLAGS, "--shutdown-grace", "0", *state)
    with _run_story(server) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            assert process.stdout.read(1)
            if how == "sigterm":
                server.process.send_signal(signal.SIGTERM)
            else:
                server.process.kill()
            assert process.wait(60) == 1
            message = process.stderr.read().decode()
        finally:
            if process.poll() is None:
                process.kill()
    if how == "sigterm":  # modeld's shutdown ends the stream with its terminal line
        assert message.endswith("modeld: the generation ended shutdown\n")
    else:  # no terminal line: the connection just closed (or broke)
        last = message.splitlines()[-1]
        assert last.startswith("modeld: the connection ")
        assert last.endswith("did the server stop?)")
