"""The GPU's hardware JPEG decoder (NVJPG engines, through nvImageCodec) beside nvjpeg.

nvjpeg's CUDA decode (torchvision's) runs its Huffman pass on a host thread, behind one
process-wide lock: more decode threads do not decode more, and that pass caps the engine's
decode stage. The NVJPG engines of an A100/H100/H200 decode a baseline JPEG whole (Huffman
included) without the SMs or a host thread. So each batch is split: a share goes to the
hardware decoder on its own thread while nvjpeg decodes the rest, and the share follows
what each backend measured on recent batches (:class:`Split`), so both finish together.

Off by default (``VITSERVE_HARDWARE_DECODE``): on the H200 the service served fewer images a
second with the split than with nvjpeg alone (docs/performance.md). The engines alone decode
about half as fast as nvjpeg there, and their thread competes with the engine's for the GIL.

nvImageCodec (pip ``nvidia-nvimgcodec-cu13`` with ``nvidia-nvjpeg``) is optional: without
it, or on a GPU without NVJPG engines, :meth:`HardwareJpeg.load` gives None and nvjpeg
decodes everything.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence

import torch
from PIL import Image

log = logging.getLogger(__name__)


def small_jpeg() -> bytes:
    """A 64x48 baseline JPEG: what start-up decodes to find (and warm up) a decoder."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


class HardwareJpeg:
    """Baseline JPEGs → full-size uint8 [3, H, W] views on ``device``, from the NVJPG engines.
    One nvImageCodec decoder and CUDA stream per calling thread."""

    def __init__(self, nvimgcodec, device: torch.device) -> None:  # noqa: ANN001 - the module
        self._codec, self.device = nvimgcodec, device
        self._local = threading.local()

    @classmethod
    def load(cls, device: torch.device) -> HardwareJpeg | None:
        """The hardware decoder of ``device`` if nvImageCodec is installed and the GPU has
        NVJPG engines (it decodes a test image), else None."""
        if device.type != "cuda":
            return None
        try:
            from nvidia import nvimgcodec
        except ImportError:
            return None
        decoder = cls(nvimgcodec, device)
        try:
            images = decoder([small_jpeg()])
        except Exception as exc:  # noqa: BLE001 - no NVJPG, no nvjpeg library, ...
            log.info("no hardware JPEG decode on %s: %s", device, exc)
            return None
        if images[0] is None:
            log.info("no hardware JPEG decode on %s: it did not decode a test image", device)
            return None
        log.info("hardware JPEG decode (nvImageCodec %s) on %s", nvimgcodec.__version__, device)
        return decoder

    def _thread_state(self) -> tuple[object, torch.cuda.Stream]:
        local = self._local
        if not hasattr(local, "decoder"):
            codec = self._codec
            local.decoder = codec.Decoder(
                device_id=self.device.index or 0,
                backends=[codec.Backend(codec.BackendKind.HW_GPU_ONLY)],
                max_num_cpu_threads=1,
            )
            local.stream = torch.cuda.Stream(self.device)
        return local.decoder, local.stream

    def __call__(self, jpegs: Sequence[bytes | bytearray]) -> list[torch.Tensor | None]:
        """Each JPEG's image (None where the hardware refused it), complete on return: the
        caller's stream may read them without waiting on this thread's."""
        decoder, stream = self._thread_state()
        images = decoder.decode([bytes(j) for j in jpegs], cuda_stream=stream.cuda_stream)
        stream.synchronize()
        return [
            None if image is None else torch.from_dlpack(image).permute(2, 0, 1) for image in images
        ]


class Split:
    """What share of a batch's JPEGs the hardware decoder takes, so that it and nvjpeg,
    running side by side, finish together: each backend's recent seconds per image
    (an exponential average), and the share that balances them."""

    def __init__(self, share: float = 0.5, smoothing: float = 0.2, bounds=(0.05, 0.95)) -> None:
        self.share, self.smoothing, self.bounds = share, smoothing, bounds
        self._per_image: dict[str, float] = {}
        self._lock = threading.Lock()  # decode threads report at once

    def count(self, images: int) -> int:
        """How many of ``images`` go to the hardware decoder."""
        return round(images * self.share) if images > 1 else 0

    def observe(self, backend: str, images: int, seconds: float) -> None:
        """One backend's part of a batch: ``images`` in ``seconds``."""
        if images <= 0:
            return
        with self._lock:
            now = seconds / images
            before = self._per_image.get(backend, now)
            self._per_image[backend] = before + self.smoothing * (now - before)
            if len(self._per_image) == 2:
                hardware, nvjpeg = self._per_image["hardware"], self._per_image["nvjpeg"]
                low, high = self.bounds
                self.share = min(high, max(low, nvjpeg / (hardware + nvjpeg)))
