"""Endpoints. Each handler translates HTTP to a pipeline call and back, nothing more."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from app.api.errors import ApiError, as_api_error
from app.api.limits import BodyTooLarge
from app.api.schemas import (
    ClassifyResponse,
    ErrorResponse,
    ImageClassification,
    ImageTimings,
    LabelScore,
    ModelInfo,
    ModelsResponse,
    Readiness,
    RequestTimings,
)
from app.serving.pipeline import ImageInput, ImageResult
from app.serving.pool import ModelState

router = APIRouter()

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 415, 422, 429, 503, 504)}
IMAGE_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


async def read_images(request: Request, max_images: int) -> list[ImageInput]:
    """Multipart field ``file`` (one or more parts) or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=max_images, max_fields=max_images)
            except MultiPartException as exc:
                raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc}") from exc
            files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not files:
                raise ApiError(400, "missing_file", "multipart body has no file part named 'file'")
            return [ImageInput(f.filename, await f.read()) for f in files]
        if content_type and not (
            content_type.startswith("image/") or content_type == "application/octet-stream"
        ):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {content_type!r}: send multipart/form-data with field 'file', "
                "or the image bytes with an image/* or application/octet-stream content type",
            )
        return [ImageInput(None, await request.body())]
    except BodyTooLarge as exc:
        raise ApiError(413, "payload_too_large", str(exc)) from exc


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
) -> ClassifyResponse:
    received = time.monotonic()
    settings, pipeline = request.app.state.settings, request.app.state.pipeline
    name = model or settings.default_model
    request.state.model = name
    if top_k > settings.max_top_k:
        raise ApiError(422, "invalid_request", f"top_k must be <= {settings.max_top_k}")
    try:
        served = pipeline.serving(name)
        images = await read_images(request, settings.max_images_per_request)
        results = await pipeline.classify(
            name, images, top_k, deadline=received + settings.request_timeout_s
        )
    except Exception as exc:
        err = as_api_error(exc)
        if err.status in (400, 413, 415):
            request.app.state.metrics.rejected.labels(name, "bad_input").inc()
        raise err from exc
    return ClassifyResponse(
        model=name,
        variant=served.manifest.variant,
        results=[image_classification(r) for r in results],
        timings=RequestTimings(
            queue_ms=1000 * max(r.queue_s for r in results),
            inference_ms=1000 * max(r.inference_s for r in results),
            total_ms=1000 * (time.monotonic() - received),
        ),
    )


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
                device=str(pool.device) if m.state is ModelState.READY else None,
                dtype=str(pool.dtype).removeprefix("torch.") if m.runner else None,
                metrics=man.metrics if man else {},
            )
        )
    return ModelsResponse(default_model=pool.settings.default_model, models=infos)


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
        ready=ready, detail=detail, models={n: m.state.value for n, m in pool.models.items()}
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
