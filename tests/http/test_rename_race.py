"""The validate-then-reopen race, as a loop against a live server.

A thread keeps swapping each ``swap-N.gguf`` between a valid tiny model and one with
``llama.block_count = 600`` (which aborts llama.cpp 0.3.36: tests/gguf) with
``os.replace``, as fast as it can, while the client loads and unloads those models. When
llama.cpp reopened the path after validation, a swap in between got the invalid file
into llama.cpp and the process aborted. Now validation and load read one descriptor:
every load is of a file that was validated. The probe load is off, so nothing but that
binding stands between the race and an abort.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.gguf_bytes import U32, enc_value, rewrite_gguf
from tests.support.http import ServerFactory

MODELS = [f"swap-{index}.gguf" for index in range(12)]
RACE_S = 12.0


@pytest.fixture
def race_dir(tmp_path: Path, tiny_model_path: Path) -> tuple[Path, bytes, bytes]:
    directory = tmp_path / "race"
    directory.mkdir()
    good = tiny_model_path.read_bytes()
    bad_path = rewrite_gguf(
        tiny_model_path, tmp_path / "bad.gguf", set_kv={"llama.block_count": enc_value(U32, 600)}
    )
    for name in MODELS:
        (directory / name).write_bytes(good)
    return directory, good, bad_path.read_bytes()


def swap_forever(directory: Path, good: bytes, bad: bytes, stop: threading.Event) -> int:
    swaps = 0
    while not stop.is_set():
        for index, name in enumerate(MODELS):
            staged = directory / f".{name}.{swaps}.tmp"
            staged.write_bytes(bad if (swaps + index) % 2 else good)
            os.replace(staged, directory / name)
        swaps += 1
        # A breath between swaps: a load (a warm-up included) can
        # sometimes finish on one file, so real loads of both happen, not only failed ones.
        stop.wait(0.01)
    return swaps


def test_swapping_files_under_loads_never_aborts_the_server(
    start_server: ServerFactory, race_dir: tuple[Path, bytes, bytes]
) -> None:
    directory, good, bad = race_dir
    server = start_server(directory, "--no-probe-load", "--max-wait-ms", "60000")
    stop = threading.Event()
    swaps: list[int] = []
    swapper = threading.Thread(
        target=lambda: swaps.append(swap_forever(directory, good, bad, stop)), daemon=True
    )
    outcomes: Counter[tuple[str, int]] = Counter()
    swapper.start()
    try:
        with server.client() as client:
            deadline = time.monotonic() + RACE_S
            while time.monotonic() < deadline:
                for name in MODELS:
                    response = client.post(f"/models/{name}/load")
                    code = response.json().get("error", {}).get("code", "ok")
                    outcomes[(code, response.status_code)] += 1
                    if response.status_code == 200:
                        client.delete(f"/models/{name}/instance")
                assert server.process.poll() is None, server.log()[-3000:]
    finally:
        stop.set()
        swapper.join(timeout=30)
    assert server.process.poll() is None
    assert swaps, "the swapper did not finish"
    assert swaps[0] > 50, swaps  # the files really were swapped, many times
    # Real loads of both files happened (most requests meet a failed load's backoff:
    # 503 model_cooling_down), and nothing else.
    assert outcomes[("ok", 200)] >= 1, outcomes
    assert outcomes[("model_invalid", 422)] >= 1, outcomes
    assert outcomes[("ok", 200)] + outcomes[("model_invalid", 422)] >= 30, outcomes
    assert set(outcomes) <= {
        ("ok", 200), ("model_invalid", 422), ("model_cooling_down", 503),
    }, outcomes  # fmt: skip
    (directory / "fresh.gguf").write_bytes(good)
    with server.client() as client:  # and it still serves
        body = {"prompt": "hi", "model": "fresh.gguf", "max_tokens": 2, "stream": False}
        ok = client.post("/infer", json=body)
        assert ok.status_code == 200, ok.text
