"""A load that runs out of memory gives its memory back (issue 11, item 3).

A real server gets an address-space limit (``RLIMIT_AS``, set from outside with
``prlimit``) that Gemma's weights and context fit under, but not llama-cpp-python's
512 MiB logits array, which ``Llama()`` allocates last: the load fails late, with
``MemoryError``. Before, the half-built ``Llama`` stayed alive in the exception's
traceback: about 1 GB of address space and 380 MB of RSS held while the budget counted
them free, and the next load could hit ``GGML_ASSERT(ctx->mem_buffer != NULL)`` and
abort the process, cutting a running stream. Now the failed load is closed at once.
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path

import httpx
import pytest

from tests.support.http import GEMMA, ServerFactory, link_or_copy, ndjson, poll
from tests.support.server import RunningServer

pytestmark = pytest.mark.slow

HEADROOM_MB = 950  # Gemma's weights + context fit; its 512 MiB logits array does not
STREAM = {"prompt": "count", "model": "tiny-a.gguf", "max_tokens": 400, "temperature": 0.7}


def vm_mb(server: RunningServer) -> dict[str, int]:
    sizes = {}
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in {"VmSize", "VmRSS"}:
            sizes[name] = int(value.split()[0]) // 1024
    return sizes


def used_est_mb(client: httpx.Client) -> float:
    return float(client.get("/status").json()["used_est_mb"])


def failed_gemma_load(client: httpx.Client) -> httpx.Response:
    """Load Gemma, waiting out the cooldown a previous failure started."""
    return poll(
        lambda: client.post(f"/models/{GEMMA}/load"),
        lambda response: response.status_code != 503,
        timeout_s=10,
        every_s=0.05,
    )


def test_a_load_that_runs_out_of_memory_gives_it_back(
    start_server: ServerFactory, models_dir: Path, gemma_path: Path
) -> None:
    link_or_copy(gemma_path, models_dir / GEMMA)
    server = start_server(models_dir, "--n-ctx", "1024", "--threads", "2")
    with server.client() as client:
        warm = client.post("/infer", json={**STREAM, "max_tokens": 2, "stream": False})
        assert warm.status_code == 200
        base = vm_mb(server)
        charged_mb = used_est_mb(client)
        limit_bytes = (base["VmSize"] + HEADROOM_MB) << 20
        resource.prlimit(server.process.pid, resource.RLIMIT_AS, (limit_bytes, limit_bytes))

        # A stream runs on tiny-a while Gemma's load fails beside it.
        lines: list[dict[str, object]] = []

        def stream() -> None:
            with (
                httpx.Client(base_url=server.base_url, timeout=120) as streamer,
                streamer.stream("POST", "/infer", json=STREAM) as response,
            ):
                lines.extend(ndjson(response.read().decode()))

        streamer = threading.Thread(target=stream)
        streamer.start()
        failed = client.post(f"/models/{GEMMA}/load")
        streamer.join(timeout=120)
        assert failed.status_code == 500, failed.text
        assert failed.json()["error"]["code"] == "model_load_failed"
        # late either way: after the weights (the context), or after the context too
        message = failed.json()["error"]["message"]
        assert "out of memory" in message or "Failed to create llama_context" in message
        terminal = [line for line in lines if line.get("done")]
        assert len(terminal) == 1, lines[-3:]
        assert terminal[0]["done_reason"] == "length"

        after = vm_mb(server)
        assert after["VmSize"] - base["VmSize"] < 200, (base, after)  # was about +1000
        assert after["VmRSS"] - base["VmRSS"] < 64, (base, after)  # was about +380
        assert used_est_mb(client) == charged_mb  # nothing held, nothing charged

        # Failing again and again does not pile up.
        for _ in range(3):
            again = failed_gemma_load(client)
            assert again.json()["error"]["code"] == "model_load_failed"
        repeated = vm_mb(server)
        assert repeated["VmSize"] - base["VmSize"] < 250, (base, repeated)
        assert repeated["VmRSS"] - base["VmRSS"] < 64, (base, repeated)

        # The memory is really there for the next load.
        loaded = client.post("/models/tiny-b.gguf/load")
        assert loaded.status_code == 200, loaded.text
        body = {**STREAM, "model": "tiny-b.gguf", "max_tokens": 2, "stream": False}
        assert client.post("/infer", json=body).status_code == 200
    assert server.process.poll() is None
