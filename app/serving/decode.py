"""Decode stage, run once per batch: what the queue holds → one normalised batch on the device.

The queue holds what clients sent (compressed bytes, ~100 KB a photo), never decoded float
tensors (600 KB each at 224×224), so a full queue costs little memory. When a batch closes,
its JPEGs that nvjpeg decodes as Pillow does (:class:`~app.serving.preprocess.Probe`) are
decoded together on the GPU (``torchvision.io.decode_jpeg(device="cuda")``), then resized
and cropped there one by one with the eval transform's own steps. Everything else -- PNG,
WebP, progressive, CMYK or EXIF-rotated JPEGs, and every image of a CPU replica -- goes
through the CPU path in the decode thread pool (``Preprocessor.decode_crop``: simplejpeg for
upright RGB JPEGs, Pillow for the rest, both at draft scale for large JPEGs; reported as
decoder "pillow"). Both paths give uint8 crops, normalised together on the model's device.

On a GPU each decode thread runs on its own CUDA stream, so the next batches decode while
the current one computes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from app.serving.preprocess import Preprocessor, Probe, TensorResizeCrop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """An image as the client sent it, with its header already checked."""

    data: bytes
    probe: Probe


@dataclass(frozen=True)
class Preprocessed:
    """An image the client already resized, cropped and normalised (the v2 protocol's FP32
    input): float32 [3, H, W] on the host, fed to the model as it is."""

    tensor: torch.Tensor


@dataclass(frozen=True)
class Pixels:
    """A decoded RGB image, uint8 [3, H, W] at the size the client sent (the v2 protocol's
    UINT8 input): resized and cropped in the decode stage, with the batch, on the model's
    device, as nvjpeg's output is -- not image by image on the HTTP worker's CPU."""

    tensor: torch.Tensor


# What a queue item carries: bytes, a uint8 crop [3, H, W] decoded ahead of time (compare
# mode decodes an image once for all the variants that share its preprocessing), decoded
# pixels still to resize, or a ready input.
Payload = Encoded | torch.Tensor | Pixels | Preprocessed


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
        # the eval transform's resize and centre crop of decoded images, on their device
        self.resize_crop = TensorResizeCrop(preprocessor.resize_crop)
        self._streams = threading.local()  # one CUDA stream per decode thread

    @property
    def _stream(self) -> torch.cuda.Stream | None:
        if self.device.type != "cuda":
            return None
        if not hasattr(self._streams, "stream"):
            self._streams.stream = torch.cuda.Stream(self.device)
        return self._streams.stream

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
        own = self._stream
        with torch.cuda.stream(own) if own else contextlib.nullcontext():
            crops, decoders, errors = self._crops(payloads)
            ready = {i: p.tensor for i, p in enumerate(payloads) if isinstance(p, Preprocessed)}
            rows = sorted([*crops, *ready])
            inputs = self._inputs(crops, ready, rows) if rows else None
        if own:
            own.synchronize()  # ready before the inference thread reads it
        return DecodedBatch(inputs, rows, errors, time.perf_counter() - started, decoders)

    def _inputs(
        self, crops: dict[int, torch.Tensor], ready: dict[int, torch.Tensor], rows: list[int]
    ) -> torch.Tensor:
        """The batch in ``rows`` order: crops normalised here, preprocessed inputs as sent."""
        if not ready:
            return self.preprocessor.normalize(self._gather(crops, rows)).to(self.dtype)
        shape = (len(rows), *ready[next(iter(ready))].shape)
        batch = torch.empty(shape, dtype=self.dtype, device=self.device)
        ready_at = [k for k, i in enumerate(rows) if i in ready]
        batch[ready_at] = torch.stack([ready[rows[k]] for k in ready_at]).to(
            self.device, self.dtype
        )
        if crops:
            crop_at = [k for k, i in enumerate(rows) if i in crops]
            normalized = self.preprocessor.normalize(
                self._gather(crops, [rows[k] for k in crop_at])
            )
            batch[crop_at] = normalized.to(self.dtype)
        return batch

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
        pixels = {i: p.tensor for i, p in enumerate(payloads) if isinstance(p, Pixels)}
        if pixels:
            images = [image.to(self.device, non_blocking=True) for image in pixels.values()]
            crops.update(zip(pixels, self.resize_crop(images), strict=True))
        decoders: dict[int, str] = {}
        encoded = {i: p for i, p in enumerate(payloads) if isinstance(p, Encoded)}
        on_gpu = [i for i, p in encoded.items() if self.nvjpeg and p.probe.nvjpeg_ok]
        if on_gpu:
            try:
                decoded = self.resize_crop(self.nvjpeg_decode([encoded[i].data for i in on_gpu]))
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

    def nvjpeg_decode(self, jpegs: Sequence[bytes]) -> list[torch.Tensor]:
        """JPEGs → full-size uint8 images [3, H, W] on the device, decoded as one batch."""
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def _pillow(self, data: bytes) -> torch.Tensor | Exception:
        try:
            return self.preprocessor.decode_crop(data)
        except Exception as exc:  # noqa: BLE001 - one bad image fails only its own request
            return exc
