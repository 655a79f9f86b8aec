"""Decode stage, run once per batch: what the queue holds → one normalised batch on the device.

The queue holds what clients sent (compressed bytes, ~100 KB a photo), never decoded float
tensors (600 KB each at 224×224), so a full queue costs little memory. When a batch closes,
its JPEGs that nvjpeg decodes as Pillow does (:class:`~app.serving.preprocess.Probe`) are
decoded together on the GPU (``torchvision.io.decode_jpeg(device="cuda")``); they and the
client's decoded pixels (:class:`Pixels`) are then resized, cropped and normalised into
their rows of the batch by one Triton kernel
(:class:`~app.serving.resize_kernel.ResizeCropNormalize`), whatever their sizes. Without
Triton, or for an interpolation the kernel lacks, the eval transform's own steps resize them
one size at a time (:class:`~app.serving.preprocess.TensorResizeCrop`). Everything else --
PNG, WebP, progressive, CMYK or EXIF-rotated JPEGs, and every image of a CPU replica -- goes
through the CPU path in the decode thread pool (``Preprocessor.decode_crop``: simplejpeg for
upright RGB and grey JPEGs, Pillow for the rest, both at draft scale for large JPEGs; reported as
decoder "pillow"), to uint8 crops normalised together on the model's device.

Where nvImageCodec is installed (:mod:`app.serving.nvimgcodec_jpeg`), its CUDA decoder may
take torchvision's place (``VITSERVE_GPU_JPEG_DECODER``; reported as decoder "nvimgcodec"),
and where the GPU has JPEG engines (NVJPG) a share of those JPEGs may go to the engines on a
thread of their own while nvjpeg decodes the rest, the share following what each measured
(``VITSERVE_HARDWARE_DECODE``; reported as decoder "hardware").

On a GPU each decode thread runs on its own CUDA stream, so the next batches decode while
the current one computes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from app.serving.nvimgcodec_jpeg import NvImageCodecJpeg, Split, small_jpeg
from app.serving.preprocess import Preprocessor, Probe, TensorResizeCrop

try:
    from app.serving import resize_kernel
except ImportError:  # no Triton (a CPU-only install): decoded images resize with torch
    resize_kernel = None

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """An image as the client sent it, with its header already checked."""

    data: bytes | bytearray  # a bytearray where it was copied anyway (the engine's arena)
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


# Who may decode an image, as each image's timings name it: torchvision's nvjpeg,
# nvImageCodec's CUDA decoder, the NVJPG engines, or the CPU path (simplejpeg or Pillow).
DECODER_NAMES = ("nvjpeg", "nvimgcodec", "hardware", "pillow")


@dataclass
class DecodedBatch:
    """The batch's images that decoded, as rows of ``inputs``, and why the others did not."""

    inputs: torch.Tensor | None  # [len(rows), 3, H, W], on the device, in the model's dtype
    rows: list[int]  # payload index of each row of ``inputs``
    errors: dict[int, Exception] = field(default_factory=dict)  # payload index -> error
    seconds: float = 0.0
    # payload index -> one of DECODER_NAMES
    decoders: dict[int, str] = field(default_factory=dict)


def stack_tensors(payloads: Sequence[torch.Tensor]) -> DecodedBatch:
    """The decode stage of a model fed ready tensors (tests, tools): just stack them."""
    return DecodedBatch(torch.stack(list(payloads)), list(range(len(payloads))))


def fused_resize(
    preprocessor: Preprocessor, device: torch.device
) -> resize_kernel.ResizeCropNormalize | None:
    """The one-launch resize, crop and normalise of decoded images where it runs (CUDA,
    Triton, an interpolation it implements), else None: the torch path."""
    if resize_kernel is None or device.type != "cuda":
        return None
    try:
        return resize_kernel.ResizeCropNormalize(preprocessor)
    except ValueError as exc:
        log.info("decoded images resize with torch: %s", exc)
        return None


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
        hardware: NvImageCodecJpeg | None = None,
        cuda_jpeg: NvImageCodecJpeg | None = None,
    ) -> None:
        """``hardware``: the NVJPG engines' decoder, which takes a share of each batch's
        nvjpeg JPEGs on a thread of its own; ``cuda_jpeg``: nvImageCodec's CUDA decoder, in
        place of torchvision's for those JPEGs (see :mod:`app.serving.nvimgcodec_jpeg`)."""
        self.preprocessor, self.device, self.dtype, self.pool = preprocessor, device, dtype, pool
        self.nvjpeg = nvjpeg and device.type == "cuda"
        self.cuda_jpeg = cuda_jpeg if self.nvjpeg else None
        # what the metrics call the decoder of the GPU's CUDA path
        self.gpu_decoder = "nvimgcodec" if self.cuda_jpeg else "nvjpeg"
        self.hardware = hardware if self.nvjpeg else None
        self.split = Split()
        self._hardware_pool = (
            ThreadPoolExecutor(2, thread_name_prefix="nvjpg") if self.hardware else None
        )
        # decoded images on the device: into the batch in one kernel where it runs, else the
        # eval transform's resize and centre crop, one size at a time
        self.fused = fused_resize(preprocessor, device)
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
        """One image through each path, so nvjpeg's and the JPEG engines' start-up (and the
        resize kernel's compilation) is not a request's."""
        data = small_jpeg()
        pixels = (
            [Pixels(torch.zeros(3, 48, 64, dtype=torch.uint8))] if self.fused is not None else []
        )
        jpeg = Encoded(data, self.preprocessor.probe(data))
        batch = self([jpeg, jpeg, *pixels])  # two: one each for nvjpeg and the JPEG engines
        if batch.errors:
            raise next(iter(batch.errors.values()))
        self.split = Split()  # a cold start's timings are not the backends' speeds

    def __call__(self, payloads: Sequence[Payload]) -> DecodedBatch:
        started = time.perf_counter()
        own = self._stream
        with torch.cuda.stream(own) if own else contextlib.nullcontext():
            crops, images, decoders, errors = self._decode(payloads)
            ready = {i: p.tensor for i, p in enumerate(payloads) if isinstance(p, Preprocessed)}
            rows = sorted([*crops, *images, *ready])
            inputs = self._inputs(crops, images, ready, rows) if rows else None
        if own:
            own.synchronize()  # ready before the inference thread reads it
        return DecodedBatch(inputs, rows, errors, time.perf_counter() - started, decoders)

    def _inputs(
        self,
        crops: dict[int, torch.Tensor],
        images: dict[int, torch.Tensor],
        ready: dict[int, torch.Tensor],
        rows: list[int],
    ) -> torch.Tensor:
        """The batch in ``rows`` order: crops normalised here, full-size decoded images
        resized into their rows by the kernel, preprocessed inputs as sent."""
        if not images and not ready:
            return self.preprocessor.normalize(self._gather(crops, rows)).to(self.dtype)
        shape = next(iter(ready.values())).shape if ready else (3, *self.resize_crop.crop)
        batch = torch.empty((len(rows), *shape), dtype=self.dtype, device=self.device)
        at = {i: k for k, i in enumerate(rows)}
        if ready:
            stacked = torch.stack(self._upload(list(ready.values())))
            batch[[at[i] for i in ready]] = stacked.to(self.dtype)
        if crops:
            normalized = self.preprocessor.normalize(self._gather(crops, list(crops)))
            batch[[at[i] for i in crops]] = normalized.to(self.dtype)
        if images:
            self.fused(list(images.values()), batch, [at[i] for i in images])
        return batch

    def _gather(self, crops: dict[int, torch.Tensor], rows: list[int]) -> torch.Tensor:
        """One float batch on the device: host crops (uint8, Pillow's) cross in one copy."""
        on_host = [k for k, i in enumerate(rows) if crops[i].device.type == "cpu"]
        on_device = [k for k, i in enumerate(rows) if crops[i].device.type != "cpu"]
        shape = (len(rows), *crops[rows[0]].shape)
        batch = torch.empty(shape, dtype=torch.float32, device=self.device)
        if on_host:
            batch[on_host] = torch.stack(self._upload([crops[rows[k]] for k in on_host])).float()
        if on_device:
            batch[on_device] = torch.stack([crops[rows[k]] for k in on_device]).float()
        return batch

    def _upload(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors of one dtype → the same on the device, in one copy through pinned
        memory: a copy per tensor from pageable memory is a staged, synchronous transfer
        each, where this is one host copy and one asynchronous transfer a batch."""
        if self.device.type != "cuda":
            return tensors
        sizes = [t.numel() for t in tensors]
        staged = torch.empty(sum(sizes), dtype=tensors[0].dtype, pin_memory=True)
        torch.cat([t.reshape(-1) for t in tensors], out=staged)
        flat = staged.to(self.device, non_blocking=True)  # the pinned block is kept till done
        return [part.view(t.shape) for part, t in zip(flat.split(sizes), tensors, strict=True)]

    def _decode(
        self, payloads: Sequence[Payload]
    ) -> tuple[
        dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, str], dict[int, Exception]
    ]:
        """Each payload's uint8 crop, or its full-size decoded image on the device where the
        kernel resizes it, or its error; and which decoder made it."""
        crops = {i: p for i, p in enumerate(payloads) if isinstance(p, torch.Tensor)}
        images: dict[int, torch.Tensor] = {}
        pixels = {i: p.tensor for i, p in enumerate(payloads) if isinstance(p, Pixels)}
        if pixels:
            self._place(
                dict(zip(pixels, self._upload(list(pixels.values())), strict=True)), crops, images
            )
        decoders: dict[int, str] = {}
        encoded = {i: p for i, p in enumerate(payloads) if isinstance(p, Encoded)}
        on_gpu = [i for i, p in encoded.items() if self.nvjpeg and p.probe.nvjpeg_ok]
        # The CPU path's images start first and decode in the pool while nvjpeg decodes the
        # rest: a batch waits for the slower of the two, not for their sum.
        gpu = set(on_gpu)
        on_cpu = {
            i: self.pool.submit(self._pillow, p.data) for i, p in encoded.items() if i not in gpu
        }
        # likewise the hardware decoder's share, on its own thread
        on_hardware = on_gpu[: self.split.count(len(on_gpu))] if self.hardware else []
        on_gpu = on_gpu[len(on_hardware) :]
        hardware = (
            self._hardware_pool.submit(
                self._timed, "hardware", self.hardware, [encoded[i].data for i in on_hardware]
            )
            if on_hardware
            else None
        )
        if on_gpu:
            jpegs = [encoded[i].data for i in on_gpu]
            decoded = self._guarded(
                self.gpu_decoder, on_gpu, lambda: self._timed("nvjpeg", self.nvjpeg_decode, jpegs)
            )
            on_cpu |= self._place_decoded(
                decoded, self.gpu_decoder, encoded, crops, images, decoders
            )
        if hardware is not None:
            decoded = self._guarded("hardware", on_hardware, hardware.result)
            on_cpu |= self._place_decoded(decoded, "hardware", encoded, crops, images, decoders)
        errors: dict[int, Exception] = {}
        for i, future in on_cpu.items():
            result = future.result()
            if isinstance(result, Exception):
                errors[i] = result
            else:
                crops[i], decoders[i] = result, "pillow"
        return crops, images, decoders, errors

    def _place(
        self,
        decoded: dict[int, torch.Tensor],
        crops: dict[int, torch.Tensor],
        images: dict[int, torch.Tensor],
    ) -> None:
        """Full-size decoded images join ``images`` for the kernel, or (without it) are
        resized and cropped here into ``crops``."""
        if self.fused is not None:
            images.update(decoded)
        else:
            crops.update(zip(decoded, self.resize_crop(list(decoded.values())), strict=True))

    def _timed(self, backend: str, decode, jpegs: list) -> list:  # noqa: ANN001
        """``decode(jpegs)``, its time per image feeding the split between backends."""
        started = time.perf_counter()
        decoded = decode(jpegs)
        self.split.observe(backend, len(jpegs), time.perf_counter() - started)
        return decoded

    @staticmethod
    def _guarded(
        decoder: str, rows: list[int], decode: Callable[[], list[torch.Tensor | None]]
    ) -> dict[int, torch.Tensor | None]:
        """``decode()``'s images by row, or None for every row where it raised (one bad image
        fails nvjpeg's whole batch): the CPU path then takes them one by one."""
        try:
            return dict(zip(rows, decode(), strict=True))
        except Exception as exc:  # noqa: BLE001 - any failure: Pillow decodes them
            log.warning("%s failed on %d images (%s); Pillow decodes them", decoder, len(rows), exc)
            return dict.fromkeys(rows)

    def _place_decoded(
        self,
        decoded: dict[int, torch.Tensor | None],
        decoder: str,
        encoded: dict[int, Encoded],
        crops: dict[int, torch.Tensor],
        images: dict[int, torch.Tensor],
        decoders: dict[int, str],
    ) -> dict[int, Future]:
        """Place a GPU decoder's images; what it refused (None) goes to the CPU path."""
        done = {i: image for i, image in decoded.items() if image is not None}
        self._place(done, crops, images)
        decoders.update(dict.fromkeys(done, decoder))
        return {
            i: self.pool.submit(self._pillow, encoded[i].data) for i in decoded if i not in done
        }

    def nvjpeg_decode(self, jpegs: Sequence[bytes | bytearray]) -> list[torch.Tensor | None]:
        """JPEGs → full-size uint8 images [3, H, W] on the device, decoded as one batch by
        nvImageCodec's CUDA decoder (None where it refused one) or torchvision's."""
        if self.cuda_jpeg is not None:
            return self.cuda_jpeg(jpegs)
        encoded = [  # frombuffer needs a writable buffer: bytes are copied once, into one
            torch.frombuffer(
                data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8
            )
            for data in jpegs
        ]
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def _pillow(self, data: bytes) -> torch.Tensor | Exception:
        try:
            return self.preprocessor.decode_crop(data)
        except Exception as exc:  # noqa: BLE001 - one bad image fails only its own request
            return exc
