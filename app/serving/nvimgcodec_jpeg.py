"""nvImageCodec's GPU JPEG decoders: the hardware one (NVJPG engines) beside nvjpeg, and its
CUDA one (nvjpeg with nvImageCodec's own host threads) in place of torchvision's.

nvjpeg's CUDA decode (torchvision's) runs its Huffman pass on a host thread, behind one
process-wide lock: more decode threads do not decode more, and that pass caps the engine's
decode stage. The NVJPG engines of an A100/H100/H200 decode a baseline JPEG whole (Huffman
included) without the SMs or a host thread. So each batch is split: a share goes to the
hardware decoder on its own thread while nvjpeg decodes the rest, and the share follows
what each backend measured on recent batches (:class:`Split`), so both finish together.

Off by default (``VITSERVE_HARDWARE_DECODE``): on the H200 the service served fewer images a
second with the split than with nvjpeg alone (docs/performance.md). The engines alone decode
about half as fast as nvjpeg there, and their thread competes with the engine's for the GIL.

nvImageCodec's CUDA decoder (``VITSERVE_GPU_JPEG_DECODER=nvimgcodec``) is the same nvjpeg
decode in place of torchvision's, its Huffman pass spread over host threads of its own that
run outside the GIL: one engine's decode stage is then no longer one host thread's.
Unmeasured on a GPU so far, so off by default.

nvImageCodec (pip ``nvidia-nvimgcodec-cu13`` with ``nvidia-nvjpeg``) is optional: without
it, or on a GPU without NVJPG engines, :meth:`NvImageCodecJpeg.load` gives None and torchvision's
nvjpeg decodes everything.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence

import torch
from PIL import Image

from app.config import Settings

log = logging.getLogger(__name__)


def small_jpeg() -> bytes:
    """A 64x48 baseline JPEG: what start-up decodes to find (and warm up) a decoder."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


class NvImageCodecJpeg:
    """Baseline JPEGs → full-size uint8 [3, H, W] views on ``device``, from one nvImageCodec
    backend: ``"hardware"`` (the NVJPG engines) or ``"cuda"`` (nvjpeg's CUDA decoder, its
    Huffman pass on ``cpu_threads`` host threads of nvImageCodec's own, outside the GIL and
    torchvision's lock). One decoder per calling thread."""

    # nvImageCodec's backend kinds: its nvjpeg CUDA decoder registers as HYBRID_CPU_GPU (the
    # Huffman pass on the host), so a decoder asked for GPU_ONLY has no JPEG decoder at all
    BACKENDS = {"hardware": "HW_GPU_ONLY", "cuda": "HYBRID_CPU_GPU"}

    def __init__(
        self,
        nvimgcodec,  # noqa: ANN001 - the module
        device: torch.device,
        backend: str = "hardware",
        cpu_threads: int = 1,
    ) -> None:
        self._codec, self.device = nvimgcodec, device
        self.backend, self.cpu_threads = backend, cpu_threads
        self._local = threading.local()

    @classmethod
    def load(
        cls, device: torch.device, backend: str = "hardware", cpu_threads: int = 1
    ) -> NvImageCodecJpeg | None:
        """The ``backend`` decoder of ``device`` if nvImageCodec is installed and runs it
        here (it decodes a test image; the hardware backend needs NVJPG engines), else None."""
        if device.type != "cuda":
            return None
        try:
            from nvidia import nvimgcodec
        except ImportError:
            return None
        decoder = cls(nvimgcodec, device, backend, cpu_threads)
        try:
            images = decoder([small_jpeg()])
        except Exception as exc:  # noqa: BLE001 - no NVJPG, no nvjpeg library, ...
            log.info("no nvImageCodec %s JPEG decode on %s: %s", backend, device, exc)
            return None
        if images[0] is None:
            log.info("no nvImageCodec %s JPEG decode on %s: a test image failed", backend, device)
            return None
        log.info(
            "nvImageCodec %s JPEG decode (%s, %d host threads) on %s",
            backend,
            nvimgcodec.__version__,
            cpu_threads,
            device,
        )
        return decoder

    @classmethod
    def asked(
        cls, settings: Settings, device: torch.device, backend: str
    ) -> NvImageCodecJpeg | None:
        """The ``backend`` decoder of ``device`` where ``settings`` ask for it
        (``VITSERVE_HARDWARE_DECODE``, ``VITSERVE_GPU_JPEG_DECODER``) and it runs, else None;
        asked for and not running is worth a warning, not only :meth:`load`'s info line."""
        wanted = (
            settings.hardware_decode
            if backend == "hardware"
            else settings.gpu_jpeg_decoder == "nvimgcodec"
        )
        if not settings.gpu_decode or not wanted:
            return None
        threads = settings.nvimgcodec_threads if backend == "cuda" else 1
        found = cls.load(device, backend, threads)
        if found is None:
            log.warning("nvImageCodec's %s JPEG decoder does not run on %s", backend, device)
        return found

    def _thread_state(self) -> tuple[object, torch.cuda.Stream]:
        local = self._local
        if not hasattr(local, "decoder"):
            codec = self._codec
            kind = getattr(codec.BackendKind, self.BACKENDS[self.backend])
            local.decoder = codec.Decoder(
                device_id=self.device.index or 0,
                backends=[codec.Backend(kind)],
                max_num_cpu_threads=self.cpu_threads,
            )
            local.stream = torch.cuda.Stream(self.device)
        return local.decoder, local.stream

    def __call__(self, jpegs: Sequence[bytes | bytearray]) -> list[torch.Tensor | None]:
        """Each JPEG's image (None where the backend refused it), complete on return: the
        caller's stream may read them without waiting on this thread's."""
        decoder, stream = self._thread_state()
        # bytes and bytearrays (the engine's copies out of the arena) go in as they are
        images = decoder.decode(list(jpegs), cuda_stream=stream.cuda_stream)
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
