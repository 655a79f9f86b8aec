"""The request path for classification, LitServe-style: probe → batch → decode → predict → encode.

A request's images are only *probed* on arrival (header checks: bad input is refused
before it queues); the queue holds their compressed bytes, and each closed batch is
decoded as a whole by the model's decode stage (``app.serving.decode``: nvjpeg on a GPU,
Pillow elsewhere) before its forward pass. Each stage is replaceable on its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from app.serving.batcher import Prediction
from app.serving.decode import Encoded, Payload
from app.serving.pool import ModelPool, ModelState, ServedModel
from app.serving.preprocess import ImageTooLarge


class ModelUnavailable(Exception):
    """The model is declared but not serving (absent, loading or failed): HTTP 503."""


@dataclass(frozen=True)
class ImageInput:
    filename: str | None
    data: bytes


@dataclass(frozen=True)
class Label:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class ImageResult:
    filename: str | None
    predictions: list[Label]
    probs: torch.Tensor  # [classes], kept for compare/agreement
    decode_s: float  # the decode stage of its batch
    queue_s: float
    inference_s: float
    batch_size: int
    decoder: str | None  # one of decode.DECODER_NAMES, None if decoded before


class ClassifyPipeline:
    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def serving(self, name: str) -> ServedModel:
        model = self.pool.get(name)
        if model.state is not ModelState.READY:
            reason = f": {model.reason}" if model.reason else ""
            raise ModelUnavailable(f"model {name!r} is {model.state}{reason}")
        return model

    async def classify(
        self, name: str, images: list[ImageInput], top_k: int, deadline: float
    ) -> list[ImageResult]:
        model = self.serving(name)
        payloads = self.probe_all(model, images)  # all checked before any queues
        return list(
            await asyncio.gather(
                *(
                    self.infer(model, im, p, top_k, deadline)
                    for im, p in zip(images, payloads, strict=True)
                )
            )
        )

    def probe_all(self, model: ServedModel, images: list[ImageInput]) -> list[Encoded]:
        """Every image's header checked, and the request's decoded-pixel budget: many
        large images that pass one by one could still take every core and the memory."""
        payloads = [self.probe(model, image) for image in images]
        budget = self.pool.settings.max_request_pixels
        pixels = sum(p.probe.width * p.probe.height for p in payloads)
        if pixels > budget:
            raise ImageTooLarge(
                f"the request's images decode to {pixels:,} pixels, over the budget of "
                f"{budget:,} a request (VITSERVE_MAX_REQUEST_PIXELS); send fewer or smaller"
            )
        return payloads

    @staticmethod
    def probe(model: ServedModel, image: ImageInput) -> Encoded:
        """Header checks with ``model``'s limits (no pixel decoded); raises ``InputError``."""
        return Encoded(image.data, model.preprocessor.probe(image.data))

    async def decode_crop(self, model: ServedModel, image: ImageInput) -> torch.Tensor:
        """Decode ahead of the queue, to a uint8 crop any model sharing ``model``'s
        preprocessing can take (compare mode: one decode for all its variants)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.pool.decode_pool, model.preprocessor.decode_crop, image.data
        )

    async def infer(
        self, model: ServedModel, image: ImageInput, payload: Payload, top_k: int, deadline: float
    ) -> ImageResult:
        prediction = await model.batcher.submit(payload, deadline)
        return self.encode(model, image, prediction, top_k)

    @staticmethod
    def encode(model: ServedModel, image: ImageInput, p: Prediction, top_k: int) -> ImageResult:
        ranked = zip(p.top_scores[:top_k], p.top_indices[:top_k], strict=True)
        labels = [Label(i, model.labels[i], s) for s, i in ranked]
        return ImageResult(
            image.filename,
            labels,
            p.probs,
            p.decode_s,
            p.queue_s,
            p.inference_s,
            p.batch_size,
            p.decoder,
        )
