"""Batch stage: gather single images into batches for one model.

A batch closes when it holds ``max_batch_size`` images or ``max_delay_s`` after its first
image arrived, whichever is first. Inference runs on one dedicated thread per replica (a
device is serial anyway), so the event loop keeps accepting while a batch computes and
the next batch fills meanwhile. With several replicas (one per GPU, say) a batch is only
closed once a replica is free, and goes to that one: one queue, as many batches in flight
as replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from app.serving.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The model's queue is at capacity; the client should retry later (HTTP 429)."""

    def __init__(self, model: str, retry_after_s: float) -> None:
        super().__init__(f"model {model!r} queue is full; retry in {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch ran; it was not computed (HTTP 504)."""


class BatcherStopped(Exception):
    """The batcher is shutting down and takes no new work (HTTP 503)."""


@dataclass
class Prediction:
    probs: torch.Tensor  # [classes] float32
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass
class _Item:
    image: torch.Tensor  # [3, H, W]
    deadline: float  # time.monotonic()
    future: asyncio.Future[Prediction]
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        predict: Callable[[torch.Tensor], torch.Tensor]
        | Sequence[Callable[[torch.Tensor], torch.Tensor]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        metrics: Metrics,
    ) -> None:
        self.name = name
        self._replicas = list(predict) if isinstance(predict, Sequence) else [predict]
        self.max_batch_size, self.max_delay_s = max_batch_size, max_delay_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self._metrics = metrics
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}-{i}")
            for i in range(len(self._replicas))
        ]
        self._free: asyncio.Queue[int] = asyncio.Queue()  # indices of idle replicas
        for i in range(len(self._replicas)):
            self._free.put_nowait(i)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._last_batch_s = 0.05

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop accepting, finish everything already queued, then end the worker."""
        self._accepting = False
        await self._queue.join()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*self._in_flight)
        for executor in self._executors:
            executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # ---- request side --------------------------------------------------------------------
    async def submit(self, image_3HW: torch.Tensor, deadline: float) -> Prediction:
        if not self._accepting:
            raise BatcherStopped(f"model {self.name!r} is shutting down")
        item = _Item(image_3HW, deadline, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._metrics.rejected.labels(self.name, "queue_full").inc()
            raise QueueFull(self.name, self._retry_after()) from None
        self._metrics.queue_depth.labels(self.name).set(self.depth)
        return await item.future

    def _retry_after(self) -> float:
        """Seconds to drain a full queue at the recent batch rate (at least 1)."""
        batches = self._queue.maxsize / self.max_batch_size / len(self._replicas)
        return max(1.0, batches * self._last_batch_s)

    # ---- worker side ---------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            replica = await self._free.get()  # close a batch only once it can run at once
            batch = await self._gather()
            task = asyncio.create_task(self._run_on(replica, batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _run_on(self, replica: int, batch: list[_Item]) -> None:
        try:
            await self._run_batch(batch, replica)
        finally:
            for _ in batch:
                self._queue.task_done()
            self._metrics.queue_depth.labels(self.name).set(self.depth)
            self._free.put_nowait(replica)

    async def _gather(self) -> list[_Item]:
        batch = [await self._queue.get()]
        closes_at = time.monotonic() + self.max_delay_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = closes_at - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run_batch(self, batch: list[_Item], replica: int) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # caller gave up (disconnect/cancel)
                continue
            if item.deadline <= now:
                self._metrics.rejected.labels(self.name, "deadline").inc()
                item.future.set_exception(
                    DeadlineExceeded(f"deadline passed after {now - item.enqueued:.3f}s in queue")
                )
                continue
            live.append(item)
        if not live:
            return
        images = torch.stack([item.image for item in live])
        started = time.monotonic()
        try:
            probs = await asyncio.get_running_loop().run_in_executor(
                self._executors[replica], self._replicas[replica], images
            )
        except Exception as exc:  # a failing batch fails only its own requests
            log.exception("model %s: batch of %d failed", self.name, len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        elapsed = time.monotonic() - started
        self._last_batch_s = elapsed
        self._metrics.inference.labels(self.name).observe(elapsed)
        self._metrics.batch_size.labels(self.name).observe(len(live))
        self._metrics.images.labels(self.name).inc(len(live))
        for item, row in zip(live, probs, strict=True):
            queue_s = started - item.enqueued
            self._metrics.queue_wait.labels(self.name).observe(queue_s)
            if not item.future.done():
                item.future.set_result(Prediction(row, queue_s, elapsed, len(live)))
