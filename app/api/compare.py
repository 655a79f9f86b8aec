"""``POST /compare``: one request's images through several variants, with their agreement."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.api import schemas
from app.api.errors import ApiError, rejected
from app.api.routes import ERRORS, image_classification
from app.api.uploads import IMAGE_BODY, read_images
from app.experiments.compare import Comparison, VariantRun, compare

router = APIRouter()


def parse_models(models: str, most: int) -> list[str]:
    """``a,b[,c]`` → names; the same name twice is allowed (a determinism check)."""
    names = [n.strip() for n in models.split(",")]
    if any(not n for n in names) or not 2 <= len(names) <= most:
        raise ApiError(
            422,
            "invalid_request",
            f"models: 2 to {most} comma-separated model names, got {models!r}",
        )
    return names


@router.post(
    "/compare",
    response_model=schemas.CompareResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="Run the same images through several variants and measure their agreement",
)
async def compare_variants(
    request: Request,
    models: Annotated[
        str,
        Query(
            max_length=1024,
            description="Comma-separated store names; the first is the reference the "
            "others are compared with.",
        ),
    ],
    top_k: Annotated[int, Query(ge=1, description="Predictions per image and variant.")] = 5,
) -> schemas.CompareResponse:
    received = time.monotonic()
    state = request.app.state
    settings, pipeline = state.settings, state.pipeline
    names = parse_models(models, settings.max_compare_models)
    if top_k > settings.max_top_k:
        raise ApiError(422, "invalid_request", f"top_k must be <= {settings.max_top_k}")
    for name in names:
        try:
            pipeline.serving(name)
        except Exception as exc:
            raise rejected(exc, state.metrics, [name]) from exc
    try:
        images = await read_images(request, settings.max_images_per_request)
        comparison = await compare(
            pipeline, names, images, top_k, deadline=received + settings.request_timeout_s
        )
    except Exception as exc:
        raise rejected(exc, state.metrics, names) from exc
    return compare_response(comparison, time.monotonic() - received)


def compare_response(c: Comparison, total_s: float) -> schemas.CompareResponse:
    return schemas.CompareResponse(
        reference=c.variants[0].name,
        variants=[variant_result(run) for run in c.variants],
        agreement=[
            schemas.PairAgreement(
                reference=pair.reference,
                candidate=pair.candidate,
                summary=schemas.AgreementSummary(**vars(pair.summary)),
                images=[
                    schemas.ImageAgreement(filename=r.filename, **vars(figures))
                    for r, figures in zip(c.variants[0].results, pair.per_image, strict=True)
                ],
            )
            for pair in c.agreements
        ],
        timings=schemas.CompareTimings(decodes_per_image=c.decodes, total_ms=1000 * total_s),
    )


def variant_result(run: VariantRun) -> schemas.VariantResult:
    manifest = run.model.manifest
    return schemas.VariantResult(
        model=run.name,
        variant=manifest.variant,
        compression=str(manifest.compression) if manifest.compression else None,
        results=[image_classification(r) for r in run.results],
        timings=schemas.VariantTimings(
            queue_ms=1000 * max(r.queue_s for r in run.results),
            inference_ms=1000 * max(r.inference_s for r in run.results),
            latency_ms=1000 * run.latency_s,
        ),
    )
