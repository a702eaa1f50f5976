"""Running the app on Hypercorn, with modeld owning shutdown.

On SIGTERM/SIGINT modeld stops admitting, lets running streams finish for
``--shutdown-grace`` (each still ends with its terminal line), closes every instance, and
only then tells Hypercorn to stop: Hypercorn's own shutdown would cut streams short. An
:class:`~modeld.exit_deadline.ExitDeadline` armed at the signal ends the process at
``--shutdown-grace`` + :data:`~modeld.scheduling.manager.CLOSE_TIMEOUT_S` whatever a
thread is stuck in.
SIGHUP re-reads the configuration (like ``POST /admin/reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import anyio
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from loguru import logger

from modeld.api.admin import reload_settings
from modeld.api.app import create_app
from modeld.errors import ConfigError
from modeld.exit_deadline import ExitDeadline
from modeld.observability.logging import LoopErrorLog
from modeld.observability.tracing import Tracing, tracing_from_env
from modeld.scheduling.manager import CLOSE_TIMEOUT_S, ModelManager
from modeld.settings.config import Settings
from modeld.settings.live import LiveSettings

__all__ = ["hypercorn_config", "run_server"]


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    # Idle connections and unfinished request heads. Hypercorn runs this timer only while
    # no request is in progress, so it never cuts a response.
    config.keep_alive_timeout = settings.idle_timeout
    # No read timeout: Hypercorn applies it to any stretch in which the client sends
    # nothing, including while it waits for its answer, which cut every response longer
    # than the timeout. A slow body is bounded by --body-timeout where the body is read.
    config.read_timeout = None
    config.graceful_timeout = settings.shutdown_grace + 2.0
    config.backlog = 1024
    config.accesslog = None
    config.errorlog = None
    return config


async def _serve(
    settings: Settings,
    source: Callable[[], Settings] | None,
    tracing: Tracing | None,
    deadline: ExitDeadline,
) -> None:
    asyncio.get_running_loop().set_exception_handler(LoopErrorLog())
    live = LiveSettings(settings, source)
    manager = ModelManager(live)
    app = create_app(settings, manager, tracing)
    stop = anyio.Event()

    async def on_signals() -> None:
        """SIGHUP reloads the configuration; SIGTERM/SIGINT shut down (and end this task:
        nothing is left running when serving stops)."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    with contextlib.suppress(ConfigError):  # refused and logged; old ones stay
                        await reload_settings(live, None, who="SIGHUP")
                    continue
                logger.info("shutdown requested", signal=signal.Signals(signum).name)
                deadline.start(live.current.shutdown_grace + CLOSE_TIMEOUT_S)
                abandoned = await manager.shutdown(live.current.shutdown_grace)
                if abandoned:
                    logger.error("instances abandoned at shutdown", models=abandoned)
                stop.set()
                return

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(on_signals)
        logger.info(
            "modeld serving",
            host=settings.host,
            port=settings.port,
            token_loop=str(settings.token_loop),
            tracing=tracing is not None,
        )
        # paths only at debug: nothing at info or above names a directory
        logger.debug("directories", models_dir=str(settings.models_path),
                     state_dir=str(settings.state_path))  # fmt: skip
        await hypercorn_serve(app, hypercorn_config(settings), shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        tasks.cancel_scope.cancel()
    logger.info("modeld stopped")


def run_server(settings: Settings, source: Callable[[], Settings] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; returns after a clean shutdown.

    ``source`` reads the settings again, the way ``settings`` were read, for a reload
    (SIGHUP, ``POST /admin/reload``); without it a reload changes nothing. Traces are
    exported when the ``OTEL_*`` variables ask for them; raises :class:`ConfigError` when
    they ask for what cannot be done.
    """
    tracing = tracing_from_env()
    # Armed by SIGTERM and left armed for the rest of the process: whatever still runs
    # after serving ends (trace export, interpreter exit) is under the same deadline.
    deadline = ExitDeadline()
    try:
        anyio.run(_serve, settings, source, tracing, deadline, backend="asyncio")
    finally:
        if tracing is not None:
            tracing.shutdown()  # export what is still buffered
