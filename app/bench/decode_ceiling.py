"""The request path's ceiling: the server's decode stage alone, with no model and no HTTP.

``vitserve bench service`` reports each level's throughput as a share of it, so a reader
sees how close to the request path's own limit the service runs.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from app.bench.load_client import Images
from app.devices import resolve_device, resolve_dtype
from app.serving.decode import BatchDecoder, Encoded
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


def _decode_rate(job: _Job, barrier: Any = None) -> tuple[int, float]:
    """(images decoded, seconds) of one process running the server's decode stage flat out;
    ``barrier`` (a manager's) lines processes up after their start-up, before timing."""
    settings = job.settings
    pre = Preprocessor(job.preprocessing, settings.max_image_pixels)
    dev = resolve_device(job.device)
    with ThreadPoolExecutor(settings.decode_workers) as pool:
        decoder = BatchDecoder(
            pre,
            device=dev,
            dtype=resolve_dtype(settings.dtype, dev),
            pool=pool,
            nvjpeg=settings.gpu_decode,
        )
        decoder.warm_up()
        datas = [data for _, data in job.images]
        batch = (datas * (job.batch_size // len(datas) + 1))[: job.batch_size]
        if barrier is not None:
            barrier.wait()
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < job.seconds:
            decoder([Encoded(d, pre.probe(d)) for d in batch])
            done += len(batch)
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
) -> float:
    """Images/s of the server's own decode stage (probe + batch decode + resize + crop +
    normalise, nvjpeg or Pillow as the server would choose), no model, no HTTP: the most
    the request path could deliver. With ``processes`` (the server's workers), that many
    processes run it at once on the same device, as the workers' decode stages do."""
    job = _Job(preprocessing, settings, images, device, batch_size, seconds)
    if processes == 1:
        done, elapsed = _decode_rate(job)
        return done / elapsed
    context = multiprocessing.get_context("spawn")  # no CUDA state inherited by a fork
    with context.Manager() as manager, ProcessPoolExecutor(processes, context) as executor:
        barrier = manager.Barrier(processes)
        futures = [executor.submit(_decode_rate, job, barrier) for _ in range(processes)]
        rates = [future.result() for future in futures]
    return sum(done for done, _ in rates) / max(elapsed for _, elapsed in rates)
