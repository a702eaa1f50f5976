"""``POST /admin/reload``: re-read the configuration without a restart (SIGHUP does the
same through :func:`reload_settings`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import orjson
from loguru import logger
from starlette.requests import Request
from starlette.responses import Response

from modeld.api.auth import load_api_keys
from modeld.observability.audit import audited
from modeld.settings.live import LiveSettings, ReloadOutcome

__all__ = ["reload_config", "reload_settings"]


async def reload_settings(
    live: LiveSettings, scope: Mapping[str, Any] | None, who: str = "signal"
) -> ReloadOutcome:
    """Read the sources on a thread, put the result in force, write the audit line
    (``who`` names the asker when there is no request ``scope``: a signal).

    Raises :class:`~modeld.errors.ConfigError` when the file is missing, not TOML, or
    holds a bad value: the running settings then stay as they were.
    """
    asker: dict[str, object] = {} if scope is not None else {"who": who}
    with audited("reload", None, scope, **asker) as record:
        try:
            requested = await anyio.to_thread.run_sync(live.read)
            await anyio.to_thread.run_sync(load_api_keys, requested)  # a bad key file refuses
        except Exception as exc:
            logger.error("config reload refused; the running settings stay", error=str(exc))
            raise
        outcome = live.apply(requested)
        record.details["applied"] = [c.name for c in outcome.applied]
        record.details["needs_restart"] = [c.name for c in outcome.needs_restart]
    if outcome.needs_restart:
        logger.warning(
            "config reload: these settings change only with a restart",
            settings={c.name: str(c.requested) for c in outcome.needs_restart},
        )
    return outcome


async def reload_config(request: Request) -> Response:
    outcome = await reload_settings(request.app.state.manager.live_settings, request.scope)
    return Response(orjson.dumps(outcome.to_builtins()), media_type="application/json")
