"""``vitserve serve``: the engines (one process per device, with the process engine), then
the HTTP server (uvicorn, or granian) over the app, and the engines stopped after the HTTP
workers drained.

The order matters: the metrics' shared folder exists before prometheus_client is first
imported, and the engines' sockets are in the environment before the HTTP workers start.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from typing import Any

from app.config import Settings


def serve(overrides: dict[str, Any]) -> int:
    """Run the service with ``overrides`` (settings given as flags) over the environment's
    settings, until SIGTERM or Ctrl+C; 0 after a graceful shutdown."""
    import uvicorn

    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler that was in
    # place before it started: make that one exit 0, since the shutdown was graceful.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    common = uvicorn_options(settings)
    # Worker processes build their own app from the environment: hand the flags down, and
    # give the metrics a shared folder so /metrics answers for the whole server (engines
    # included).
    for key, value in overrides.items():
        os.environ[f"VITSERVE_{key.upper()}"] = str(value)
    with tempfile.TemporaryDirectory(prefix="vitserve-metrics-") as scratch:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", scratch)
        # Only now may the app be imported: prometheus_client picks its value store (files
        # in that folder) when it is first imported.
        from app.api.app import check_experiments, create_app
        from app.serving.pool import selected_names
        from app.store import ModelStore

        # Here, not in the app's start-up: there a bad name is a traceback per worker process.
        check_experiments(settings, selected_names(settings, ModelStore(settings.store_dir)))
        supervisor = None
        if settings.engine == "process":
            from app.serving.engine.supervisor import EngineSupervisor

            supervisor = EngineSupervisor(settings)
            supervisor.start()
            os.environ.update(supervisor.sockets_env)
        try:
            if settings.http_server == "granian":
                run_granian(settings)
            elif settings.workers == 1:
                uvicorn.run(create_app(settings), **common)
            else:
                uvicorn.run(
                    "app.api.app:create_app", factory=True, workers=settings.workers, **common
                )
        finally:
            if supervisor:  # after the workers drained: nothing is left in the engines' queues
                supervisor.stop(timeout_s=settings.drain_timeout_s)
    return 0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What ``uvicorn.run`` takes from the settings, whichever way it runs the app."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": settings.drain_timeout_s,
    }


def run_granian(settings: Settings) -> None:
    """The same app under granian: its worker processes build it from the environment, as
    uvicorn's do; on SIGTERM they finish their requests, given the drain time."""
    try:
        from granian import Granian
        from granian.constants import Interfaces
    except ImportError:
        raise SystemExit(
            "VITSERVE_HTTP_SERVER=granian needs granian: pip install 'vitserve[granian]'"
        ) from None
    Granian(
        "app.api.app:create_app",
        factory=True,
        interface=Interfaces.ASGI,
        address=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level.lower(),
        log_access=settings.access_log,
        workers_kill_timeout=settings.drain_timeout_s,
    ).serve()
