"""The audit log: one JSON line at info per administrative action, with who asked (a key
id, never a key; ``anonymous`` without one), the client's address, what, and the
outcome (``ok`` or the error code)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from loguru import logger

from modeld.errors import ModelNotFound
from modeld.observability.audit import audit, audited, requester
from tests.support.http import GEMMA, GEMMA_FLAGS, LONG_STORY, ServerFactory, poll
from tests.support.operator import audit_lines


@pytest.fixture
def captured() -> Iterator[list[dict[str, Any]]]:
    """Audit records written by modeld (a library keeps its log off until enabled)."""
    records: list[dict[str, Any]] = []
    logger.enable("modeld")
    sink = logger.add(lambda m: records.append({"message": m.record["message"],
                                                "level": m.record["level"].name,
                                                **m.record["extra"]}), level="INFO")  # fmt: skip
    try:
        yield records
    finally:
        logger.remove(sink)
        logger.disable("modeld")


def test_requester_names_the_key_id_never_the_key() -> None:
    scope = {"state": {"key_id": "ops-team"}, "client": ("10.0.0.7", 51234)}
    assert requester(scope) == ("ops-team", "10.0.0.7:51234")
    assert requester({"state": {}, "client": ("127.0.0.1", 9)}) == ("anonymous", "127.0.0.1:9")
    assert requester({}) == ("anonymous", None)


def test_audited_writes_one_line_with_the_outcome(captured: list[dict[str, Any]]) -> None:
    scope = {"state": {"key_id": "k1"}, "client": ("127.0.0.1", 1)}
    with audited("unload", "m.gguf", scope):
        pass
    with pytest.raises(ModelNotFound), audited("unload", "m.gguf", scope):
        raise ModelNotFound("no")
    with pytest.raises(ZeroDivisionError), audited("load", "m.gguf", scope):
        1 / 0  # noqa: B018 - a bug inside the block
    with audited("load", "m.gguf", scope) as record:
        record.action = "pin"
        record.details["extra"] = 1
    audit("reload", None, "SIGHUP", "ok")
    lines = [(r["action"], r["who"], r["outcome"]) for r in captured]
    assert lines == [
        ("unload", "k1", "ok"),
        ("unload", "k1", "model_not_found"),
        ("load", "k1", "internal_error"),
        ("pin", "k1", "ok"),
        ("reload", "SIGHUP", "ok"),
    ]
    assert all(r["message"] == "audit" and r["audit"] is True for r in captured)
    assert all(r["level"] == "INFO" for r in captured)
    assert captured[3]["extra"] == 1


@pytest.mark.anyio
async def test_a_cancelled_action_is_audited_as_cancelled(captured: list[dict[str, Any]]) -> None:
    with anyio.move_on_after(0.01):
        with audited("load", "m.gguf", {"state": {}, "client": None}):
            await anyio.sleep(5)
    assert [(r["action"], r["outcome"]) for r in captured] == [("load", "cancelled")]


def test_every_admin_route_leaves_one_audit_line(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    expected: list[tuple[str, str, str, int]] = []  # action, target, outcome, status
    with server.client() as client:

        def act(method: str, path: str, action: str, target: str, outcome: str, **kw: Any) -> None:
            response = client.request(
                method, path, headers={"X-Request-ID": f"r{len(expected)}"}, **kw
            )
            expected.append((action, target, outcome, response.status_code))

        act("POST", "/models/tiny-a.gguf/load", "load", "tiny-a.gguf", "ok")
        act("POST", "/models/tiny-a.gguf/load", "pin", "tiny-a.gguf", "ok", json={"pin": True})
        act("POST", "/models/tiny-a.gguf/load", "unpin", "tiny-a.gguf", "ok", json={"pin": False})
        act("POST", "/models/tiny-a.gguf/load", "load", "tiny-a.gguf", "bad_request",
            json={"pin": "yes"})  # fmt: skip
        act("POST", "/models/nope.gguf/load", "load", "nope.gguf", "model_not_found")
        act("DELETE", "/models/tiny-a.gguf/instance", "unload", "tiny-a.gguf", "ok")
        act("DELETE", "/models/tiny-a.gguf/instance", "unload", "tiny-a.gguf", "model_not_found")
        act("DELETE", "/models/notes.txt/instance", "unload", "notes.txt", "invalid_model_id")
        act("DELETE", "/requests/no-such-request", "cancel", "no-such-request",
            "request_not_found")  # fmt: skip
        act("POST", "/admin/reload", "reload", None, "ok")  # type: ignore[arg-type]
        assert client.post("/infer", json={"model": "tiny-b.gguf", "prompt": "x"}).is_success
        assert client.get("/status").is_success
    lines = audit_lines(server)  # reads, generations and probes leave none
    assert [(a["action"], a["target"], a["outcome"]) for a in lines] == [
        (action, target, outcome) for action, target, outcome, _ in expected
    ]
    assert [s for *_, s in expected] == [200, 200, 200, 400, 404, 200, 404, 400, 404, 200]
    for index, line in enumerate(lines):
        assert line["request_id"] == f"r{index}"
        assert line["level"] == "info"
        assert line["message"] == "audit"
        assert line["who"] == "anonymous"
        assert str(line["client"]).startswith("127.0.0.1:")


@pytest.mark.slow
def test_cancelling_a_running_request_is_audited(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    server = start_server(gemma_dir, *GEMMA_FLAGS)
    with server.client() as client, server.client() as admin:
        ended: list[str] = []

        def stream() -> None:
            with client.stream("POST", "/infer", json=LONG_STORY,
                               headers={"X-Request-ID": "story-1"}) as response:  # fmt: skip
                for line in response.iter_lines():
                    if '"done":true' in line:
                        ended.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        poll(lambda: admin.get("/status").json()["running"], lambda n: n == 1, timeout_s=60)
        assert admin.delete("/requests/story-1").status_code == 200
        reader.join(60)
    assert '"done_reason":"cancelled"' in ended[0]
    cancel = [a for a in audit_lines(server) if a["action"] == "cancel"]
    assert [(a["target"], a["outcome"]) for a in cancel] == [("story-1", "ok")]
    assert GEMMA in server.log()
