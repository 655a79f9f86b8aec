"""App factory: wires settings → store → model pool → pipeline → routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api.compare import router as compare_router
from app.api.errors import install_error_handlers
from app.api.limits import BodySizeLimit
from app.api.observe import RequestMetrics
from app.api.routes import router
from app.api.v2.rest import router as v2_router
from app.api.v2.service import V2Service
from app.config import Settings, get_settings
from app.experiments.routing import AbRouter, check_known
from app.experiments.shadow import ShadowTraffic
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
    """The app; ``uvicorn --factory app.api.app:create_app --workers N`` runs several."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics: Metrics = app.state.metrics
        pool = serving_pool(settings, ModelStore(settings.store_dir), metrics)
        app.state.ab_router = experiments(settings, pool.selected_names(), metrics)
        app.state.pool = pool
        app.state.pipeline = ClassifyPipeline(pool)
        app.state.shadow = ShadowTraffic(settings, app.state.pipeline, metrics)
        app.state.v2 = V2Service(app.state)
        await pool.start()
        grpc = None
        if settings.grpc_port:
            from app.api.v2.grpc_server import grpc_server  # grpc loads only when served

            grpc = grpc_server(settings, app.state.v2, metrics)
            await grpc.start()
            log.info("gRPC (Open Inference Protocol) on %s:%d", settings.host, settings.grpc_port)
        try:
            yield
        finally:
            log.info("shutting down: finishing queued requests")
            if grpc is not None:
                await grpc.stop(grace=settings.request_timeout_s)
            await app.state.shadow.close()
            await pool.stop()
            metrics.process_exiting()

    # /docs and /redoc load Swagger UI and ReDoc from the package, not a CDN: they work offline.
    app = FastAPIOffline(
        title="vitserve", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(compare_router)
    app.include_router(v2_router)

    def known_models() -> dict:
        pool = getattr(app.state, "pool", None)
        return pool.models if pool else {}

    app.add_middleware(RequestMetrics, metrics=app.state.metrics, known_models=known_models)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    return app


def serving_pool(settings: Settings, store: ModelStore, metrics: Metrics) -> ModelPool:
    """The engines' models when ``vitserve serve`` started engines for this worker (it says
    where in the environment), else models loaded in this process."""
    from app.serving.engine.pool import EnginePool, engine_sockets

    sockets = engine_sockets()
    if settings.engine == "process" and sockets:
        return EnginePool(settings, store, metrics, sockets)
    return ModelPool(settings, store, metrics)


def check_experiments(settings: Settings, served: list[str]) -> None:
    """Refuse A/B and shadow settings that name models not served: a typo would silently
    route nothing. ``vitserve serve`` calls this before any worker starts."""
    shadow = settings.shadow
    check_known("VITSERVE_SHADOW", [*shadow, *shadow.values()], served)
    if settings.ab_weights:
        check_known("VITSERVE_AB_WEIGHTS", settings.ab_weights, served)


def experiments(settings: Settings, served: list[str], metrics: Metrics) -> AbRouter | None:
    """The A/B router if weights are set, after ``check_experiments``."""
    check_experiments(settings, served)
    if not settings.ab_weights:
        return None
    log.info("A/B routing %s (sticky header: %s)", settings.ab_weights, settings.ab_sticky_header)
    return AbRouter(settings.ab_weights, settings.ab_sticky_header, metrics)
