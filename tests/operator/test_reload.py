"""Configuration reload without a restart: ``POST /admin/reload`` and SIGHUP re-read the
config file; limits and per-request settings change for new requests, settings that
only a restart can change are reported (and keep their running value), and a broken file
is refused with the old settings kept."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from tests.support.http import poll
from tests.support.operator import audit_lines, log_records
from tests.support.server import RunningServer, start_modeld

BIG_PROMPT = "x" * 3000  # a ~3 KB body: under the default limit, over 2048 bytes


def _start(models_dir: Path, log_dir: Path, config: Path) -> RunningServer:
    # No --n-ctx/--max-body-bytes flags: a flag would outrank the file (flag > env > file).
    return start_modeld(models_dir, log_dir, "--threads", "1", "--config", str(config))


def _infer(client: httpx.Client, **body: object) -> httpx.Response:
    return client.post("/infer", json={"max_tokens": 4, "stream": False, **body})


def test_reload_route_changes_limits_and_reports_restart_only_settings(
    models_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "modeld.toml"
    config.write_text("[modeld]\nn_ctx = 64\nvram_budget_mb = 4000\n")
    server = _start(models_dir, tmp_path, config)
    try:
        with server.client() as client:
            # Before: no default model; a 3 KB body passes; n_ctx 64 caps 100 tokens.
            assert _infer(client, prompt="hi").json()["error"]["code"] == "no_default_model"
            assert _infer(client, model="tiny-a.gguf", prompt=BIG_PROMPT[:40]).status_code == 200
            long_answer = _infer(client, model="tiny-a.gguf", prompt="hi", max_tokens=100)
            assert long_answer.status_code == 200, long_answer.text
            assert long_answer.json()["metrics"]["completion_tokens"] < 64  # the context's end
            config.write_text(
                "[modeld]\nn_ctx = 256\nvram_budget_mb = 8000\nmax_body_bytes = 2048\n"
                "default_model = 'tiny-b.gguf'\nport = 1\n"
            )
            reloaded = client.post("/admin/reload")
            assert reloaded.status_code == 200, reloaded.text
            body = reloaded.json()
            applied = {c["setting"]: (c["old"], c["new"]) for c in body["applied"]}
            assert applied == {
                "n_ctx": (64, 256),
                "max_body_bytes": (1024 * 1024, 2048),
                "default_model": (None, "tiny-b.gguf"),
            }
            # vram_budget_mb cannot change live; port is also a flag here, and flags win
            assert body["needs_restart"] == [
                {"setting": "vram_budget_mb", "running": 4000, "requested": 8000}
            ]
            assert client.get("/status").json()["budget_mb"] == 4000

            # After: the new default model answers; the body limit is 2048 bytes.
            answer = _infer(client, prompt="hi")
            assert answer.status_code == 200
            assert answer.json()["model"] == "tiny-b.gguf"
            too_big = _infer(client, prompt=BIG_PROMPT)
            assert too_big.status_code == 413
            # A new load gets the new n_ctx: tiny-a reloaded now takes 100 tokens.
            assert client.delete("/models/tiny-a.gguf/instance").status_code == 200
            long_answer = _infer(client, model="tiny-a.gguf", prompt="hi", max_tokens=100)
            assert long_answer.status_code == 200, long_answer.text
            assert long_answer.json()["metrics"]["completion_tokens"] == 100
        warnings = [r for r in log_records(server) if r["level"] == "warning"]
        assert any(r.get("settings") == {"vram_budget_mb": "8000"} for r in warnings)
    finally:
        server.stop()


def test_a_broken_file_is_refused_and_the_old_settings_stay(
    models_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "modeld.toml"
    config.write_text("[modeld]\nmax_body_bytes = 2048\ndefault_model = 'tiny-a.gguf'\n")
    server = _start(models_dir, tmp_path, config)
    broken = {
        "[modeld]\nmax_body_bytes = = 4096\n": "is not valid TOML",
        "[modeld]\nmax_body_bytes = 10\n": "max_body_bytes",  # below its bound
        "[modeld]\nmax_bodybytes = 4096\n": "unknown setting 'max_bodybytes'",
        "[modeld]\nmax_queue_depth = 'many'\n": "max_queue_depth",
    }
    try:
        with server.client() as client:
            for text, message in broken.items():
                config.write_text(text)
                refused = client.post("/admin/reload")
                assert refused.status_code == 400, text
                assert refused.json()["error"]["code"] == "bad_config"
                assert message in refused.json()["error"]["message"], text
            config.unlink()
            missing = client.post("/admin/reload")
            assert missing.status_code == 400
            assert "cannot read config file" in missing.json()["error"]["message"]
            # Nothing changed: the default model and the 2048-byte limit are in force.
            assert _infer(client, prompt="hi").json()["model"] == "tiny-a.gguf"
            assert _infer(client, prompt=BIG_PROMPT).status_code == 413
        outcomes = [(a["action"], a["outcome"]) for a in audit_lines(server)]
        assert outcomes == [("reload", "bad_config")] * 5
    finally:
        server.stop()


def test_sighup_reloads_and_a_broken_file_keeps_serving(models_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "modeld.toml"
    config.write_text("[modeld]\ndefault_model = 'tiny-a.gguf'\n")
    server = _start(models_dir, tmp_path, config)
    try:
        with server.client() as client:
            assert _infer(client, prompt="hi").json()["model"] == "tiny-a.gguf"
            config.write_text("[modeld]\ndefault_model = 'tiny-c.gguf'\nhost = '0.0.0.0'\n")
            server.process.send_signal(signal.SIGHUP)
            poll(lambda: len(audit_lines(server)), lambda n: n == 1)
            assert _infer(client, prompt="hi").json()["model"] == "tiny-c.gguf"
            # host is a flag of the test server, so it did not change: nothing to restart.
            config.write_text("[modeld\n")
            server.process.send_signal(signal.SIGHUP)
            poll(lambda: len(audit_lines(server)), lambda n: n == 2)
            assert _infer(client, prompt="hi").json()["model"] == "tiny-c.gguf"
            assert client.get("/healthz").status_code == 200
        first, second = audit_lines(server)
        assert first["who"] == "SIGHUP"
        assert first["outcome"] == "ok"
        assert first["applied"] == ["default_model"]
        assert second["outcome"] == "bad_config"
        refusals = [r for r in log_records(server) if r["message"].startswith("config reload ref")]
        assert len(refusals) == 1
        assert "not valid TOML" in str(refusals[0]["error"])
    finally:
        assert server.stop() == 0


def test_a_reload_changes_the_api_key_and_a_bad_key_is_refused(
    models_dir: Path, tmp_path: Path
) -> None:
    old_key, new_key = "old-key-0123456789abcdef", "new-key-fedcba9876543210"
    config = tmp_path / "modeld.toml"
    config.write_text(f"[modeld]\napi_key = '{old_key}'\ndefault_model = 'tiny-a.gguf'\n")
    server = _start(models_dir, tmp_path, config)

    def status_with(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.get(server.base_url + "/status", headers=headers, timeout=30).status_code

    try:
        assert status_with(old_key) == 200
        assert status_with(new_key) == 401
        # A key too short to be a key: refused, and the running key stays in force.
        config.write_text("[modeld]\napi_key = 'short'\n")
        refused = httpx.post(
            server.base_url + "/admin/reload",
            headers={"Authorization": f"Bearer {old_key}"},
            timeout=30,
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "bad_config"
        assert "short" not in refused.text  # the key is never echoed
        assert status_with(old_key) == 200
        config.write_text(f"[modeld]\napi_key = '{new_key}'\ndefault_model = 'tiny-a.gguf'\n")
        reloaded = httpx.post(
            server.base_url + "/admin/reload",
            headers={"Authorization": f"Bearer {old_key}"},
            timeout=30,
        )
        assert reloaded.status_code == 200, reloaded.text
        assert status_with(new_key) == 200
        assert status_with(old_key) == 401
        page = httpx.get(server.base_url + "/", headers={"Accept": "text/html"}, timeout=30)
        assert page.status_code == 200  # the page itself is open; its data needs the key
        assert 'role="meter"' in page.text
    finally:
        server.stop()
