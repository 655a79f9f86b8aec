"""Compare mode: the same images through several variants, and how far apart they land.

Each image is decoded once per distinct preprocessing (a dense model and its compressed
copy share one, so usually once in all), before the queues, then every variant gets the
crops through its own batcher, all variants at once, as live traffic would reach them.
A variant's latency runs from its images entering its queue to its last result; the
variants share the device meanwhile, so read latencies side by side, not as isolated
benchmarks. The first variant named is the reference; every other is compared with it,
image by image.

A comparison is all or nothing: if one variant cannot run (queue full, deadline), the
others are cancelled and the request fails with that variant's error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from app.experiments.agreement import Agreement, AgreementSummary, agreement, summarize
from app.serving.decode import Payload
from app.serving.pipeline import ClassifyPipeline, ImageInput, ImageResult
from app.serving.pool import ServedModel

T = TypeVar("T")


@dataclass(frozen=True)
class VariantRun:
    name: str
    model: ServedModel
    results: list[ImageResult]
    latency_s: float  # from its images entering its queue to its last result


@dataclass(frozen=True)
class PairAgreement:
    reference: str
    candidate: str
    per_image: list[Agreement]
    summary: AgreementSummary


@dataclass(frozen=True)
class Comparison:
    variants: list[VariantRun]
    agreements: list[PairAgreement]
    decodes: int  # distinct preprocessings, each decoding every image once (0: none here)


def preprocessing_key(model: ServedModel) -> str:
    return model.manifest.preprocessing.model_dump_json()


async def compare(
    pipeline: ClassifyPipeline,
    names: list[str],
    images: list[ImageInput],
    top_k: int,
    deadline: float,
    payloads: list[Payload] | None = None,
) -> Comparison:
    """``payloads``: what every variant queues, prepared by the caller (the v2 protocol's
    UINT8 and FP32 inputs), for variants that share one preprocessing; else each image is
    decoded here once per distinct preprocessing."""
    models = [pipeline.serving(name) for name in names]
    by_key: dict[str, ServedModel] = {}
    for model in models:
        by_key.setdefault(preprocessing_key(model), model)
    if payloads is not None:
        decoded = dict.fromkeys(by_key, payloads)
    else:
        for model in by_key.values():
            pipeline.probe_all(model, images)  # refuse bad images and the pixel budget first
        flat = await all_or_nothing(
            pipeline.decode_crop(model, image) for model in by_key.values() for image in images
        )
        decoded = {
            key: flat[i * len(images) : (i + 1) * len(images)] for i, key in enumerate(by_key)
        }
    runs = await all_or_nothing(
        run_variant(pipeline, model, images, decoded[preprocessing_key(model)], top_k, deadline)
        for model in models
    )
    reference = runs[0]
    agreements = [pair_agreement(reference, other) for other in runs[1:]]
    metrics = pipeline.pool.metrics
    for pair in agreements:
        for figures in pair.per_image:
            metrics.record_agreement("compare", pair.reference, pair.candidate, figures)
    return Comparison(runs, agreements, 0 if payloads is not None else len(by_key))


async def run_variant(
    pipeline: ClassifyPipeline,
    model: ServedModel,
    images: list[ImageInput],
    crops: list[Payload],
    top_k: int,
    deadline: float,
) -> VariantRun:
    started = time.monotonic()
    results = await all_or_nothing(
        pipeline.infer(model, im, crop, top_k, deadline)
        for im, crop in zip(images, crops, strict=True)
    )
    return VariantRun(model.name, model, results, time.monotonic() - started)


async def all_or_nothing(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; at the first failure cancel the rest and raise that failure itself
    (a TaskGroup raises an ExceptionGroup, which the HTTP layer could not map to a status)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coro) for coro in coros]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def pair_agreement(reference: VariantRun, candidate: VariantRun) -> PairAgreement:
    per_image = [
        agreement(a.probs, b.probs)
        for a, b in zip(reference.results, candidate.results, strict=True)
    ]
    return PairAgreement(reference.name, candidate.name, per_image, summarize(per_image))
