"""Endpoints. Each handler translates HTTP to a pipeline call and back, nothing more."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from app.api.errors import ApiError, rejected
from app.api.schemas import (
    ClassifyResponse,
    ErrorResponse,
    ImageClassification,
    ImageTimings,
    LabelScore,
    ModelInfo,
    ModelsResponse,
    Readiness,
    ReloadResponse,
    RequestTimings,
    RoutedBy,
)
from app.api.uploads import IMAGE_BODY, read_images
from app.serving.pipeline import ImageResult
from app.serving.pool import ModelState
from app.store.hints import build_command

router = APIRouter()

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 415, 422, 429, 503, 504)}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="Classify one or more images",
)
async def classify(
    request: Request,
    model: Annotated[str | None, Query(max_length=128, description="Store name.")] = None,
    top_k: Annotated[int, Query(ge=1, description="Predictions per image.")] = 5,
) -> Response:
    received = time.monotonic()
    state = request.app.state
    settings, pipeline = state.settings, state.pipeline
    if top_k > settings.max_top_k:
        raise ApiError(422, "invalid_request", f"top_k must be <= {settings.max_top_k}")
    name, routed_by = choose_model(request, model)
    request.state.model = name
    try:
        served = pipeline.serving(name)
        images = await read_images(request, settings.max_images_per_request)
        results = await pipeline.classify(
            name, images, top_k, deadline=received + settings.request_timeout_s
        )
    except Exception as exc:
        raise rejected(exc, state.metrics, [name]) from exc
    state.shadow.mirror(served, images, results)
    body = ClassifyResponse(
        model=name,
        variant=served.manifest.variant,
        routed_by=routed_by,
        results=[image_classification(r) for r in results],
        timings=RequestTimings(
            queue_ms=1000 * max(r.queue_s for r in results),
            inference_ms=1000 * max(r.inference_s for r in results),
            total_ms=1000 * (time.monotonic() - received),
        ),
    )
    # Serialized once, here: a model returned as it is, FastAPI would first validate again
    # against response_model (the hot path's answer; response_model still documents it).
    return Response(body.model_dump_json(), media_type="application/json")


def choose_model(request: Request, model: str | None) -> tuple[str, RoutedBy]:
    """``?model=`` wins; else the A/B weights, if set and a weighted variant is ready."""
    if model:
        return model, "query"
    state = request.app.state
    router = state.ab_router
    if router is not None:
        sticky = request.headers.get(router.sticky_header, "") if router.sticky_header else ""
        # no value, or an empty one (it would pin all such clients together): random draw
        chosen = router.choose(sticky or None, state.pool.is_ready)
        if chosen is not None:
            return chosen, "ab"
    return state.settings.default_model, "default"


def image_classification(r: ImageResult) -> ImageClassification:
    return ImageClassification(
        filename=r.filename,
        predictions=[
            LabelScore(index=p.index, label=p.label, score=p.score) for p in r.predictions
        ],
        timings=ImageTimings(
            decode_ms=1000 * r.decode_s,
            queue_ms=1000 * r.queue_s,
            inference_ms=1000 * r.inference_s,
            batch_size=r.batch_size,
            decoder=r.decoder,
        ),
    )


@router.get("/models", response_model=ModelsResponse, summary="Every model and its state")
async def models(request: Request) -> ModelsResponse:
    pool = request.app.state.pool
    infos = []
    for m in pool.models.values():
        man = m.manifest
        infos.append(
            ModelInfo(
                name=m.name,
                state=m.state.value,
                reason=m.reason,
                default=m.name == pool.settings.default_model,
                variant=man.variant if man else None,
                architecture=man.architecture if man else None,
                compression=str(man.compression) if man and man.compression else None,
                device=",".join(m.devices) if m.state is ModelState.READY else None,
                dtype=m.dtype if m.state is ModelState.READY else None,
                source=man.source.kind if man else None,
                teacher=man.teacher.name if man and man.teacher else None,
                build=build_command(man) if man else None,
                figures=man.figures.model_dump(mode="json", exclude_none=True) if man else {},
                metrics=man.metrics if man else {},
            )
        )
    return ModelsResponse(default_model=pool.settings.default_model, models=infos)


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    summary="See entries written to the store since start; retry absent or failed ones",
)
async def reload(request: Request) -> ReloadResponse:
    token = request.app.state.settings.admin_token
    if token is None:
        raise ApiError(404, "not_found", "admin endpoints are off: set VITSERVE_ADMIN_TOKEN")
    given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
    if not hmac.compare_digest(given, token.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "Authorization: Bearer <VITSERVE_ADMIN_TOKEN> needed")
    return ReloadResponse(models=await request.app.state.pool.reload())


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Readiness: default model loaded and warmed, no model still loading",
)
async def readyz(request: Request) -> JSONResponse:
    pool = request.app.state.pool
    ready, detail = pool.readiness()
    body = Readiness(
        ready=ready,
        detail=detail,
        models={n: m.state.value for n, m in pool.models.items()},
        engines=pool.engines(),
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.scrape()
    return Response(body, media_type=content_type)
