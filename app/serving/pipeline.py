"""The request path for classification, LitServe-style: decode → batch → predict → encode.

Each stage is a method, so a faster decoder (e.g. on the GPU) or another encoding can
replace one stage without touching the others.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.serving.batcher import Prediction
from app.serving.pool import ModelPool, ModelState, ServedModel


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
class Decoded:
    image: ImageInput
    tensor: torch.Tensor  # [3, H, W], normalised
    decode_s: float


@dataclass(frozen=True)
class ImageResult:
    filename: str | None
    predictions: list[Label]
    probs: torch.Tensor  # [classes], kept for compare/agreement
    input: torch.Tensor  # [3, H, W] as the model saw it: shadow mode reuses it
    decode_s: float
    queue_s: float
    inference_s: float
    batch_size: int


class ClassifyPipeline:
    def __init__(self, pool: ModelPool, decode_workers: int) -> None:
        self.pool = pool
        self._decoder = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")

    def close(self) -> None:
        self._decoder.shutdown(wait=True)

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
        return list(await asyncio.gather(*(self._one(model, im, top_k, deadline) for im in images)))

    async def _one(
        self, model: ServedModel, image: ImageInput, top_k: int, deadline: float
    ) -> ImageResult:
        decoded = await self.decode(model, image)
        return await self.infer(model, decoded, top_k, deadline)

    async def decode(self, model: ServedModel, image: ImageInput) -> Decoded:
        """Decode with ``model``'s preprocessing (any model sharing it can use the result)."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        tensor = await loop.run_in_executor(self._decoder, model.preprocessor, image.data)
        return Decoded(image, tensor, time.monotonic() - started)

    async def infer(
        self, model: ServedModel, decoded: Decoded, top_k: int, deadline: float
    ) -> ImageResult:
        prediction = await model.batcher.submit(decoded.tensor, deadline)
        return self.encode(model, decoded, prediction, top_k)

    @staticmethod
    def encode(model: ServedModel, decoded: Decoded, p: Prediction, top_k: int) -> ImageResult:
        scores, indices = p.probs.topk(min(top_k, p.probs.numel()))
        labels = [
            Label(int(i), model.labels[int(i)], float(s))
            for s, i in zip(scores, indices, strict=True)
        ]
        return ImageResult(
            decoded.image.filename,
            labels,
            p.probs,
            decoded.tensor,
            decoded.decode_s,
            p.queue_s,
            p.inference_s,
            p.batch_size,
        )
