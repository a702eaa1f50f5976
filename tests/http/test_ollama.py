"""Ollama's API through the real ``ollama`` client (0.6.3) and a real server, and the
contract Open WebUI relies on, checked with plain HTTP (no Open WebUI install)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import ollama
import pytest

from tests.support.http import GEMMA, GEMMA_FLAGS, ServerFactory, instance_of, poll
from tests.support.server import RunningServer

MODEL = "tiny-a.gguf"
Connect = Callable[[RunningServer], ollama.Client]
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory, module_models_dir: Path) -> RunningServer:
    return module_server_factory(module_models_dir)


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Clients of servers started by the test, closed at its end."""
    clients: list[ollama.Client] = []

    def make(server: RunningServer) -> ollama.Client:
        clients.append(ollama.Client(host=server.base_url, timeout=120))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def ndjson_lines(body: bytes) -> list[dict[str, object]]:
    """Every line one JSON object; no blank line anywhere (ollama-python json.loads each)."""
    assert body.endswith(b"\n")
    lines = body[:-1].split(b"\n")
    assert all(lines), f"a blank line in {body!r}"
    return [json.loads(line) for line in lines]


# --- listing ---------------------------------------------------------------------------


def test_list_shows_every_model_as_latest(api: ollama.Client) -> None:
    (model,) = api.list().models
    assert model.model == f"{MODEL}:latest"
    assert model.size is not None
    assert model.size > 0
    assert isinstance(model.modified_at, datetime)
    assert model.digest is not None
    assert re.fullmatch(r"[0-9a-f]{64}", model.digest)
    assert api.list().models[0].digest == model.digest  # stable
    assert model.details is not None
    assert model.details.format == "gguf"
    assert model.details.family == "llama"
    assert model.details.quantization_level == "F32"
    assert model.details.parameter_size is not None
    assert re.fullmatch(r"\d+(\.\d+)?[KMB]?", model.details.parameter_size)


@pytest.mark.parametrize("name", [MODEL, f"{MODEL}:latest", "tiny-a", "tiny-a:latest"])
def test_show_accepts_every_form_of_the_name(api: ollama.Client, name: str) -> None:
    shown = api.show(name)
    assert shown.details is not None
    assert shown.details.family == "llama"
    assert shown.capabilities is not None
    assert "completion" in shown.capabilities
    info = shown.modelinfo
    assert info is not None
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] == 512
    assert info["general.parameter_count"] > 0
    assert info["tokenizer.ggml.tokens"] is None  # 267 strings: never listed
    for value in info.values():
        assert not isinstance(value, list) or len(value) <= 64
    assert isinstance(shown.modified_at, datetime)


# --- generate ---------------------------------------------------------------------------


def test_generate_whole_and_streamed_agree(api: ollama.Client) -> None:
    whole = api.generate(model=MODEL, prompt="hello", options=GREEDY)
    assert whole.done is True
    assert whole.done_reason == "length"
    assert whole.eval_count == 8
    assert whole.prompt_eval_count is not None
    assert whole.prompt_eval_count > 0
    for duration in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(whole[duration], int), duration
    assert whole.total_duration is not None
    assert whole.eval_duration is not None
    assert whole.total_duration >= whole.eval_duration > 0
    parts = list(api.generate(model="tiny-a:latest", prompt="hello", options=GREEDY, stream=True))
    assert parts[-1].done is True
    assert all(part.done is False for part in parts[:-1])
    assert "".join(part.response or "" for part in parts) == whole.response
    assert parts[-1].eval_count == 8
    assert isinstance(parts[-1].eval_duration, int)
    assert parts[0].model == "tiny-a:latest"  # the name as the client sent it


def test_options_are_mapped_and_unknown_ones_ignored(api: ollama.Client) -> None:
    plain = api.generate(model=MODEL, prompt="hello", options=GREEDY)
    noisy = {**GREEDY, "mirostat": 2, "num_gpu": 99, "use_mmap": False, "new_topic_penalty": 1,
             "num_thread": 3, "repeat_last_n": 64, "num_ctx": 100_000}  # fmt: skip
    assert api.generate(model=MODEL, prompt="hello", options=noisy).response == plain.response
    three = api.generate(model=MODEL, prompt="hello", options={**GREEDY, "num_predict": 3})
    assert three.eval_count == 3
    assert plain.response is not None
    assert three.response is not None
    assert plain.response.startswith(three.response)
    sampled = {"temperature": 0.9, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "seed": 7,
               "repeat_penalty": 1.1, "num_predict": 8}  # fmt: skip
    first = api.generate(model=MODEL, prompt="hello", options=sampled)
    assert api.generate(model=MODEL, prompt="hello", options=sampled).response == first.response
    assert api.generate(model=MODEL, prompt="hello", options={**sampled, "seed": -1}).done


def test_stop_strings_end_the_answer(api: ollama.Client) -> None:
    plain = api.generate(model=MODEL, prompt="hello", options={**GREEDY, "num_predict": 20})
    assert plain.response
    word = re.search(r"[a-z]{3,}", plain.response)  # the random bytes around it are not text
    assert word is not None
    stop = word.group()
    stopped = api.generate(
        model=MODEL, prompt="hello", options={**GREEDY, "num_predict": 20, "stop": [stop]}
    )
    assert stopped.done_reason == "stop"
    assert stopped.response is not None
    assert stop not in stopped.response


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (lambda api: api.generate(model="missing", prompt="x"), 404, 'model "missing" not found'),
        (lambda api: api.show("tiny-a:7b"), 404, 'model "tiny-a:7b" not found'),
        (lambda api: api.generate(model=MODEL, prompt="x", think=True), 400, "thinking"),
        (
            lambda api: api.generate(model=MODEL, prompt="x", images=["aGk="]),
            400,
            "does not support images",
        ),
        (
            lambda api: api.generate(model=MODEL, prompt="x", options={"temperature": "hot"}),
            400,
            '"temperature"',
        ),
        (
            lambda api: api.generate(model=MODEL, prompt="x", options={"temperature": 9}),
            400,
            '"temperature"',
        ),
        (
            lambda api: api.generate(model=MODEL, prompt="x", keep_alive="a while"),
            400,
            "duration",
        ),
        (lambda api: api.pull("tiny-a"), 501, "does not pull"),
        (lambda api: api.delete("tiny-a"), 501, "delete"),
    ],
)
def test_errors_are_response_errors_with_a_string(
    api: ollama.Client, call: object, status: int, message: str
) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        call(api)  # type: ignore[operator]
    assert caught.value.status_code == status
    assert isinstance(caught.value.error, str)
    assert message in caught.value.error


def test_protocol_errors_outside_the_handlers_take_ollama_s_shape(server: RunningServer) -> None:
    with server.client() as client:
        forbidden = client.get("/api/tags", headers={"Host": "evil.example"})
        assert forbidden.status_code == 403
        assert forbidden.json() == {"error": "Host header is not allowed"}
        assert client.get("/api/nothing").json() == {"error": "Not Found"}
        too_big = client.post("/api/generate", content=b"{" + b" " * (2 << 20) + b"}")
        assert too_big.status_code == 413
        assert isinstance(too_big.json()["error"], str)
        assert client.post("/api/generate", content=b"[1,").status_code == 400
        assert client.post("/api/generate", json={"prompt": "x"}).json() == {
            "error": "model is required"
        }
        # modeld's own routes keep modeld's shape
        assert client.get("/models/x", headers={"Host": "evil.example"}).json()["error"]["code"]


# --- Open WebUI's contract, in plain HTTP --------------------------------------------------


def test_open_webui_contract(server: RunningServer) -> None:
    with server.client() as client:
        version = client.get("/api/version").json()["version"]
        assert re.fullmatch(r"\d+\.\d+\.\d+", version)
        assert tuple(map(int, version.split("."))) >= (0, 6, 4)  # Copilot's minimum
        assert client.head("/api/version").status_code == 200
        entries = client.get("/api/tags").json()["models"]
        by_model = {entry["model"]: entry for entry in entries if "model" in entry}
        assert f"{MODEL}:latest" in by_model  # Open WebUI adds ":latest" and looks it up
        body = {"model": f"{MODEL}:latest", "prompt": "hello", "options": GREEDY}
        response = client.post("/api/generate", json=body)
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = ndjson_lines(response.content)
        assert lines[-1]["done"] is True
        assert isinstance(lines[-1]["eval_count"], int)
        assert isinstance(lines[-1]["eval_duration"], int)
        assert all(isinstance(line["created_at"], str) for line in lines)
        for line in lines:
            datetime.fromisoformat(str(line["created_at"]))
        (loaded,) = client.get("/api/ps").json()["models"]
        expires_at = datetime.fromisoformat(loaded["expires_at"])
        assert expires_at.tzinfo is not None
        assert expires_at > datetime.now(UTC)
        assert loaded["model"] == f"{MODEL}:latest"
        assert loaded["context_length"] == 256  # the suite's --n-ctx
        assert loaded["size"] > 0
        assert loaded["size_vram"] in (0, loaded["size"])


# --- load, unload, keep-alive ------------------------------------------------------------


def test_empty_prompt_loads_and_keep_alive_zero_unloads(
    start_server: ServerFactory, models_dir: Path, connect: Connect
) -> None:
    server = start_server(models_dir)
    api = connect(server)
    assert api.ps().models == []
    loaded = api.generate(model="tiny-b", prompt="", keep_alive="10m")
    assert loaded.done is True
    assert loaded.done_reason == "load"
    (instance,) = api.ps().models
    assert instance.model == "tiny-b.gguf:latest"
    assert instance.expires_at is not None
    remaining = instance.expires_at - datetime.now(UTC)
    assert timedelta(minutes=9) < remaining <= timedelta(minutes=10)
    assert instance.context_length == 256
    unloaded = api.generate(model="tiny-b.gguf:latest", prompt="", keep_alive=0)
    assert unloaded.done is True
    assert unloaded.done_reason == "unload"
    assert api.ps().models == []  # gone before the answer came
    with server.client() as client:
        assert instance_of(client, "tiny-b.gguf") is None
    never = api.generate(model="tiny-c", prompt="hi", options=GREEDY, keep_alive=-1)
    assert never.done_reason == "length"
    (kept,) = api.ps().models
    assert kept.expires_at is not None
    assert kept.expires_at - datetime.now(UTC) > timedelta(days=365 * 50)
    with server.client() as client:
        status = instance_of(client, "tiny-c.gguf")
        assert status is not None
        assert status["keep_alive_seconds"] is None


def test_unload_while_busy_waits_for_the_answer(
    start_server: ServerFactory, models_dir: Path, connect: Connect
) -> None:
    """keep_alive 0 with an empty prompt cancels nothing: the model goes once idle."""
    server = start_server(models_dir)
    api = connect(server)
    stream = api.generate(model=MODEL, prompt="hello", options={**GREEDY, "num_predict": 200},
                          stream=True)  # fmt: skip
    first = next(stream)
    assert first.done is False
    assert api.generate(model=MODEL, prompt="", keep_alive=0).done_reason == "unload"
    rest = list(stream)
    assert rest[-1].done_reason == "length"
    assert rest[-1].eval_count == 200
    with server.client() as client:
        poll(lambda: instance_of(client, MODEL), lambda instance: instance is None)


@pytest.mark.slow
def test_a_stream_ended_by_an_eviction_raises(
    start_server: ServerFactory, gemma_dir: Path, connect: Connect
) -> None:
    server = start_server(gemma_dir, *GEMMA_FLAGS)
    api = connect(server)
    stream: Iterator[ollama.GenerateResponse] = api.generate(
        model="gemma-3-270m-q4_k_m", prompt="Tell a long story.", stream=True,
        options={"num_predict": 900, "temperature": 0.7},
    )  # fmt: skip
    assert next(stream).done is False
    assert httpx.delete(f"{server.base_url}/models/{GEMMA}/instance").status_code == 200
    with pytest.raises(ollama.ResponseError) as caught:
        for _ in stream:
            pass
    assert isinstance(caught.value.error, str)
    assert "ended early (evicted)" in caught.value.error

    # unstreamed, the same ending is an error status
    evicted: list[int] = []

    def evict_soon() -> None:
        with server.client() as client:
            poll(  # generating (not loading, not tokenizing): an eviction now ends it
                lambda: client.get("/status").json()["running"],
                lambda running: running == 1,
                timeout_s=60,  # the reload after the eviction above comes first
            )
            evicted.append(client.delete(f"/models/{GEMMA}/instance").status_code)

    evictor = threading.Thread(target=evict_soon)
    evictor.start()
    with pytest.raises(ollama.ResponseError) as caught:
        api.generate(model=GEMMA, prompt="Tell a long story.", options={"num_predict": 900})
    evictor.join(timeout=60)
    assert evicted == [200]
    assert caught.value.status_code == 503
    assert "ended early (evicted)" in caught.value.error


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_the_model(
    start_server: ServerFactory, gemma_dir: Path, connect: Connect
) -> None:
    server = start_server(gemma_dir, *GEMMA_FLAGS)
    body = {"model": GEMMA, "prompt": "Tell a long story.", "options": {"num_predict": 900}}
    with server.client() as client:
        with client.stream("POST", "/api/generate", json=body) as response:
            first = json.loads(next(response.iter_lines()))
            assert first["done"] is False
        # the connection is closed: the generation is cancelled, the model free again
        poll(lambda: instance_of(client, GEMMA), lambda i: i is not None and i["inflight"] == 0)
    quick = connect(server).generate(model=GEMMA, prompt="Hi", options={"num_predict": 2})
    assert quick.done_reason == "length"
