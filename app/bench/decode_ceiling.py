"""The request path's ceiling: the server's decode stage alone, with no model and no HTTP.

``vitserve bench service`` reports each level's throughput as a share of it, so a reader
sees how close to the request path's own limit the service runs, and where the stage's
time goes per image (:func:`stage_times`: probe, decode, resize + crop, normalise; on CUDA
with the resize kernel, resize + crop includes normalising, as the served path does).
"""

from __future__ import annotations

import io
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from PIL import Image

from app.bench.load_client import Images
from app.devices import resolve_device, resolve_dtype
from app.serving.decode import BatchDecoder, Encoded
from app.serving.nvimgcodec_jpeg import NvImageCodecJpeg
from app.serving.preprocess import Preprocessor


@dataclass(frozen=True)
class _Job:
    """What each process of a ceiling run needs (picklable, for spawned processes)."""

    preprocessing: Any
    settings: Any
    images: Images
    device: str
    batch_size: int
    seconds: float
    threads: int = 1


def _batch_of(images: Images, batch_size: int) -> list[bytes]:
    """``batch_size`` image bodies, cycling through ``images``."""
    datas = [data for _, data in images]
    return (datas * (batch_size // len(datas) + 1))[:batch_size]


def _warm_decoder(
    pre: Preprocessor, settings: Any, dev: torch.device, pool: Executor, *, nvjpeg: bool
) -> BatchDecoder:
    """The decode stage as the server builds it (``settings``' dtype, nvImageCodec's decoders
    where they run and are asked for), warmed up."""
    decoder = BatchDecoder(
        pre,
        device=dev,
        dtype=resolve_dtype(settings.dtype, dev),
        pool=pool,
        nvjpeg=nvjpeg,
        hardware=NvImageCodecJpeg.asked(settings, dev, "hardware") if nvjpeg else None,
        cuda_jpeg=NvImageCodecJpeg.asked(settings, dev, "cuda") if nvjpeg else None,
    )
    decoder.warm_up()
    return decoder


def _decode_rate(job: _Job, barrier: Any = None) -> tuple[int, float]:
    """(images decoded, seconds) of one process running the server's decode stage flat out,
    on ``job.threads`` threads at once as an engine's decode threads do; ``barrier`` (a
    manager's) lines processes up after their start-up, before timing."""
    settings = job.settings
    pre = Preprocessor(job.preprocessing, settings.max_image_pixels)
    dev = resolve_device(job.device)
    with ThreadPoolExecutor(settings.decode_workers) as pool:
        decoder = _warm_decoder(pre, settings, dev, pool, nvjpeg=settings.gpu_decode)
        batch = _batch_of(job.images, job.batch_size)
        if barrier is not None:
            barrier.wait()
        started = time.perf_counter()

        def flat_out(_: int) -> int:
            done = 0
            while time.perf_counter() - started < job.seconds:
                decoder([Encoded(d, pre.probe(d)) for d in batch])
                done += len(batch)
            return done

        with ThreadPoolExecutor(job.threads) as lanes:
            done = sum(lanes.map(flat_out, range(job.threads)))
        return done, time.perf_counter() - started


def decode_ceiling(
    preprocessing: Any,
    settings: Any,
    images: Images,
    *,
    device: str,
    batch_size: int,
    seconds: float,
    processes: int = 1,
    threads: int = 1,
) -> float:
    """Images/s of the server's own decode stage (probe + batch decode + resize + crop +
    normalise, nvjpeg or Pillow as the server would choose), no model, no HTTP: the most
    the request path could deliver. With ``processes`` (the server's workers), that many
    processes run it at once on the same device, as inline workers' decode stages do; with
    ``threads``, each runs that many batches at once, as an engine's decode threads do."""
    job = _Job(preprocessing, settings, images, device, batch_size, seconds, threads)
    if processes == 1:
        done, elapsed = _decode_rate(job)
        return done / elapsed
    context = multiprocessing.get_context("spawn")  # no CUDA state inherited by a fork
    with context.Manager() as manager, ProcessPoolExecutor(processes, context) as executor:
        barrier = manager.Barrier(processes)
        futures = [executor.submit(_decode_rate, job, barrier) for _ in range(processes)]
        rates = [future.result() for future in futures]
    return sum(done for done, _ in rates) / max(elapsed for _, elapsed in rates)


def stage_times(
    preprocessing: Any,
    settings: Any,
    images: Images,
    *,
    device: str,
    batch_size: int,
    repeats: int = 5,
) -> dict[str, Any]:
    """Milliseconds per image of each step of the decode stage on one batch, the steps run
    one after another in one thread and each synchronised (the GPU's share is timed, not
    queued): medians over ``repeats``. The path is the server's: nvjpeg for the JPEGs it
    takes on a CUDA device, the CPU decode otherwise (simplejpeg or Pillow; a server spreads
    it over its decode threads, this is one thread's cost). Where the decode stage resizes
    nvjpeg's images with its kernel (path ``nvjpeg+kernel``), that one step also
    normalises: ``normalize`` is then nothing."""
    pre = Preprocessor(preprocessing, settings.max_image_pixels)
    dev = resolve_device(device)
    batch = _batch_of(images, batch_size)
    nvjpeg = settings.gpu_decode and dev.type == "cuda"
    if nvjpeg:
        batch = [d for d in batch if pre.probe(d).nvjpeg_ok] or batch

    def timed(run: Callable[[], Any]) -> tuple[Any, float]:
        started = time.perf_counter()
        out = run()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out, time.perf_counter() - started

    def cpu_decode() -> list[Any]:  # the server's: simplejpeg where it may, else Pillow
        pixels = [pre.decode_jpeg(d, Image.open(io.BytesIO(d))) for d in batch]
        return [pre.decode(d) if p is None else p for d, p in zip(batch, pixels, strict=True)]

    def cpu_resize(decoded: list[Any]) -> list[torch.Tensor]:  # the server's (torch)
        return [
            pre.crop(image) if isinstance(image, Image.Image) else resize_crop([image])[0]
            for image in decoded
        ]

    samples: dict[str, list[float]] = {
        s: [] for s in ("probe", "decode", "resize_crop", "normalize")
    }
    with ThreadPoolExecutor(1) as pool:
        decoder = _warm_decoder(pre, settings, dev, pool, nvjpeg=nvjpeg)

        fused = nvjpeg and decoder.fused is not None  # the served path on CUDA with Triton

        def kernel(decoded: list[torch.Tensor]) -> torch.Tensor:
            shape = (len(decoded), 3, *decoder.resize_crop.crop)
            return decoder.fused(decoded, torch.empty(shape, dtype=decoder.dtype, device=dev))

        def normalize(crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
            if fused:
                return crops  # the kernel's batch, normalised already
            return pre.normalize(torch.stack(crops).to(dev)).to(decoder.dtype)

        resize_crop = decoder.resize_crop
        decode = partial(decoder.nvjpeg_decode, batch) if nvjpeg else cpu_decode
        resize = kernel if fused else resize_crop if nvjpeg else cpu_resize
        for round_ in range(repeats + 1):  # the first round warms caches and is dropped
            _, probe_s = timed(lambda: [pre.probe(d) for d in batch])
            decoded, decode_s = timed(decode)
            crops, resize_s = timed(partial(resize, decoded))
            _, normalize_s = timed(partial(normalize, crops))
            if round_:
                steps = (probe_s, decode_s, resize_s, normalize_s)
                for step, seconds in zip(samples, steps, strict=True):
                    samples[step].append(seconds)
    ms = {step: 1e3 * statistics.median(v) / len(batch) for step, v in samples.items()}
    path = "nvjpeg+kernel" if fused else "nvjpeg" if nvjpeg else "cpu"
    return {"path": path, "images": len(batch), "ms_per_image": ms}
