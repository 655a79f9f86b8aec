"""Decode stage, run once per batch: what the queue holds → one normalised batch on the device.

The queue holds what clients sent (compressed bytes, ~100 KB a photo), never decoded float
tensors (600 KB each at 224×224), so a full queue costs little memory. When a batch closes,
its JPEGs that nvjpeg decodes as Pillow does (:class:`~app.serving.preprocess.Probe`) are
decoded together on the GPU (``torchvision.io.decode_jpeg(device="cuda")``), then resized
and cropped there together, as two batched matrix products (:mod:`app.serving.resize`).
Everything else -- PNG, WebP, progressive, CMYK or EXIF-rotated JPEGs, and every image of a
CPU replica -- goes through Pillow in the decode thread pool, with draft-mode downscaling of
large JPEGs. Both paths give uint8 crops, normalised together on the model's device.

On a GPU the stage runs on its own CUDA stream, so the next batch decodes while the
current one computes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from app.serving.preprocess import Preprocessor, Probe
from app.serving.resize import BatchResizeCrop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """An image as the client sent it, with its header already checked."""

    data: bytes
    probe: Probe


# What a queue item carries: bytes, or a uint8 crop [3, H, W] decoded ahead of time (compare
# mode decodes an image once for all the variants that share its preprocessing).
Payload = Encoded | torch.Tensor


@dataclass
class DecodedBatch:
    """The batch's images that decoded, as rows of ``inputs``, and why the others did not."""

    inputs: torch.Tensor | None  # [len(rows), 3, H, W], on the device, in the model's dtype
    rows: list[int]  # payload index of each row of ``inputs``
    errors: dict[int, Exception] = field(default_factory=dict)  # payload index -> error
    seconds: float = 0.0
    decoders: dict[int, str] = field(default_factory=dict)  # payload index -> "nvjpeg"/"pillow"


def stack_tensors(payloads: Sequence[torch.Tensor]) -> DecodedBatch:
    """The decode stage of a model fed ready tensors (tests, tools): just stack them."""
    return DecodedBatch(torch.stack(list(payloads)), list(range(len(payloads))))


class BatchDecoder:
    """Payloads → normalised batch on ``device``, nvjpeg where it may, Pillow elsewhere."""

    def __init__(
        self,
        preprocessor: Preprocessor,
        *,
        device: torch.device,
        dtype: torch.dtype,
        pool: Executor,
        nvjpeg: bool,
    ) -> None:
        self.preprocessor, self.device, self.dtype, self.pool = preprocessor, device, dtype, pool
        self.nvjpeg = nvjpeg and device.type == "cuda"
        self._resize_crop = BatchResizeCrop(preprocessor.resize_crop)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def warm_up(self) -> None:
        """One image through each path, so nvjpeg's start-up is not a request's."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 60, 30)).save(buffer, "JPEG")
        data = buffer.getvalue()
        batch = self([Encoded(data, self.preprocessor.probe(data))])
        if batch.errors:
            raise next(iter(batch.errors.values()))

    def __call__(self, payloads: Sequence[Payload]) -> DecodedBatch:
        started = time.perf_counter()
        stream = torch.cuda.stream(self._stream) if self._stream else contextlib.nullcontext()
        with stream:
            crops, decoders, errors = self._crops(payloads)
            rows = sorted(crops)
            inputs = None
            if rows:
                inputs = self.preprocessor.normalize(self._gather(crops, rows)).to(self.dtype)
        if self._stream:
            self._stream.synchronize()  # ready before the inference thread reads it
        return DecodedBatch(inputs, rows, errors, time.perf_counter() - started, decoders)

    def _gather(self, crops: dict[int, torch.Tensor], rows: list[int]) -> torch.Tensor:
        """One float batch on the device: host crops (uint8, Pillow's) cross in one copy."""
        on_host = [k for k, i in enumerate(rows) if crops[i].device.type == "cpu"]
        on_device = [k for k, i in enumerate(rows) if crops[i].device.type != "cpu"]
        shape = (len(rows), *crops[rows[0]].shape)
        batch = torch.empty(shape, dtype=torch.float32, device=self.device)
        for part, move in ((on_host, True), (on_device, False)):
            if part:
                stacked = torch.stack([crops[rows[k]] for k in part])
                batch[part] = (stacked.to(self.device) if move else stacked).float()
        return batch

    def _crops(
        self, payloads: Sequence[Payload]
    ) -> tuple[dict[int, torch.Tensor], dict[int, str], dict[int, Exception]]:
        """Each payload's uint8 crop (or its error), and which decoder made it."""
        crops = {i: p for i, p in enumerate(payloads) if isinstance(p, torch.Tensor)}
        decoders: dict[int, str] = {}
        encoded = {i: p for i, p in enumerate(payloads) if isinstance(p, Encoded)}
        on_gpu = [i for i, p in encoded.items() if self.nvjpeg and p.probe.nvjpeg_ok]
        if on_gpu:
            try:
                decoded = self._nvjpeg([encoded[i].data for i in on_gpu])
                crops.update(zip(on_gpu, decoded, strict=True))
                decoders.update(dict.fromkeys(on_gpu, "nvjpeg"))
            except Exception as exc:  # noqa: BLE001 - one bad image fails nvjpeg's whole batch
                log.warning(
                    "nvjpeg failed on %d images (%s); Pillow decodes them", len(on_gpu), exc
                )
        by_pillow = [i for i in encoded if i not in crops]
        errors: dict[int, Exception] = {}
        results = self.pool.map(self._pillow, [encoded[i].data for i in by_pillow])
        for i, result in zip(by_pillow, results, strict=True):
            if isinstance(result, Exception):
                errors[i] = result
            else:
                crops[i], decoders[i] = result, "pillow"
        return crops, decoders, errors

    def _nvjpeg(self, jpegs: Sequence[bytes]) -> list[torch.Tensor]:
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        return list(
            self._resize_crop(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        )

    def _pillow(self, data: bytes) -> torch.Tensor | Exception:
        try:
            return self.preprocessor.decode_crop(data)
        except Exception as exc:  # noqa: BLE001 - one bad image fails only its own request
            return exc
