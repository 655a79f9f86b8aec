"""App factory: wires settings → store → model pool → pipeline → routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api.errors import install_error_handlers
from app.api.limits import BodySizeLimit
from app.api.observe import RequestMetrics
from app.api.routes import router
from app.config import Settings, get_settings
from app.serving.metrics import Metrics
from app.serving.pipeline import ClassifyPipeline
from app.serving.pool import ModelPool
from app.store import ModelStore

log = logging.getLogger(__name__)

DESCRIPTION = """
Serve dense and compressed DeiT side by side. Images are dynamically batched per model
onto the GPU (CPU fallback). Errors are JSON: `{"error": {"code", "message", "detail"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = ModelPool(settings, ModelStore(settings.store_dir), app.state.metrics)
        app.state.pool = pool
        app.state.pipeline = ClassifyPipeline(pool, settings.decode_workers)
        await pool.start()
        try:
            yield
        finally:
            log.info("shutting down: finishing queued requests")
            await pool.stop()
            app.state.pipeline.close()

    app = FastAPI(title="vitserve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.include_router(router)

    def known_models() -> dict:
        pool = getattr(app.state, "pool", None)
        return pool.models if pool else {}

    app.add_middleware(RequestMetrics, metrics=app.state.metrics, known_models=known_models)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    return app
