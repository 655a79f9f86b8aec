"""Batch stage: gather single images into batches for one model, decode them, run them.

A batch closes when it holds ``max_batch_size`` images or ``max_delay_s`` after its first
image arrived, whichever is first. The queue holds payloads as clients sent them
(compressed bytes); a closed batch is decoded as a whole (``decode``, e.g.
:class:`~app.serving.decode.BatchDecoder`: nvjpeg on a GPU), then computed. Each replica
has one decode thread and one inference thread, and two batch slots: while one batch
computes the next ones decode (``decode_threads`` at once), so neither the device nor the
decoder waits on the other. On a CPU there is one slot: decode and compute take the same
cores, and overlapping them slows the forward more than it saves.
A decode thread hands its batch straight to the inference thread: the event loop only
closes batches and hands out results, so a busy loop (every HTTP worker's images go through
it in the engine) never keeps the device waiting for a batch already decoded.
A batch is only closed once a slot is free, so under load batches grow to the size the
device drains. With several replicas (one per GPU, say) there is still one queue; a
batch goes to the replica whose slot freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from app.serving.decode import DecodedBatch, stack_tensors
from app.serving.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The model's queue is at capacity; the client should retry later (HTTP 429)."""

    def __init__(self, model: str, retry_after_s: float) -> None:
        super().__init__(f"model {model!r} queue is full; retry in {retry_after_s:.0f}s")
        self.model, self.retry_after_s = model, retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch ran; it was not computed (HTTP 504)."""


class BatcherStopped(Exception):
    """The batcher is shutting down and takes no new work (HTTP 503)."""


@dataclass
class Prediction:
    probs: torch.Tensor  # [classes] float32
    top_scores: list[float]  # the batcher's top-k, best first: computed once per batch
    top_indices: list[int]
    queue_s: float
    decode_s: float  # the decode stage of its batch
    inference_s: float
    batch_size: int
    # "nvjpeg" (torchvision's), "nvimgcodec" (its CUDA decoder), "hardware" (the NVJPG
    # engines), "pillow" (the CPU path: simplejpeg or Pillow), or None for a payload decoded
    # beforehand
    decoder: str | None


@dataclass
class Computed:
    """What a batcher has computed since it started. An engine's status frames carry it, so
    a bench can tell the forward's share of the engine's time per image from the rest."""

    images: int = 0
    batches: int = 0
    forward_s: float = 0.0  # on the inference thread, per batch as timed for the metrics
    forward_cpu_s: float = 0.0  # the inference thread's own CPU in them (not its OpenMP pool)


Predict = Callable[[torch.Tensor], torch.Tensor]
Decode = Callable[[Sequence[Any]], DecodedBatch]


@dataclass
class _Item:
    payload: Any  # what ``decode`` takes: app.serving.decode.Payload in the service
    deadline: float  # time.monotonic()
    future: asyncio.Future[Prediction]
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        predict: Predict | Sequence[Predict],
        *,
        decode: Decode | Sequence[Decode] = stack_tensors,
        top_k: int = 5,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        metrics: Metrics,
        decode_threads: int = 1,
        pipelined: bool = True,
    ) -> None:
        """``predict`` and ``decode``: one each per replica (a single one: one replica;
        the default ``decode`` stacks ready tensors). ``top_k``: the most classes a caller may
        ask for; they are ranked for the whole batch on the inference thread, so the event
        loop never touches a tensor per image. ``decode_threads``: batches a replica decodes
        at once (``decode`` must be safe to call from that many threads). ``pipelined``:
        decode the next batches while one computes; off where decode and compute share the
        same cores (a CPU), since there a decode thread preempts one of the forward's OpenMP
        threads and every parallel region waits for it (measured on 2 cores: the forward
        took 2.6x as long beside one decode thread)."""
        self.name = name
        self.top_k = top_k
        self._replicas = list(predict) if isinstance(predict, Sequence) else [predict]
        self._decoders = (
            list(decode) if isinstance(decode, Sequence) else [decode] * len(self._replicas)
        )
        if len(self._decoders) != len(self._replicas):
            raise ValueError(f"{len(self._replicas)} replicas but {len(self._decoders)} decoders")
        self.max_batch_size, self.max_delay_s = max_batch_size, max_delay_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self._metrics = metrics
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}-{i}")
            for i in range(len(self._replicas))
        ]
        self._decode_executors = [
            ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix=f"decode-{name}-{i}")
            for i in range(len(self._replicas))
        ]
        self._free: asyncio.Queue[int] = asyncio.Queue()  # a free batch slot, by replica
        # one batch computing, the next ones decoding; unpipelined, one batch at a time
        for _ in range(decode_threads + 1 if pipelined else 1):
            for i in range(len(self._replicas)):
                self._free.put_nowait(i)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._last_batch_s = 0.05
        self.computed = Computed()
        # this model's children of the metrics, looked up once (they are touched per image)
        self._queue_depth = metrics.queue_depth.labels(name)
        self._queue_wait = metrics.queue_wait.labels(name)

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
        for executor in self._executors + self._decode_executors:
            executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # ---- request side --------------------------------------------------------------------
    async def submit(self, payload: Any, deadline: float) -> Prediction:
        return await self.enqueue(payload, deadline)

    def enqueue(self, payload: Any, deadline: float) -> asyncio.Future[Prediction]:
        """Queue an image; its prediction's future. Raises at once when it cannot queue.
        (The engine answers from the future's callback: no task per image.)"""
        if not self._accepting:
            raise BatcherStopped(f"model {self.name!r} is shutting down")
        item = _Item(payload, deadline, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._metrics.rejected.labels(self.name, "queue_full").inc()
            raise QueueFull(self.name, self._retry_after()) from None
        return item.future

    def _retry_after(self) -> float:
        """Seconds to drain a full queue at the recent batch rate (at least 1)."""
        batches = self._queue.maxsize / self.max_batch_size / len(self._replicas)
        return max(1.0, batches * self._last_batch_s)

    # ---- worker side ---------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            replica = await self._free.get()  # close a batch only once a slot is free
            batch = await self._gather()
            self._queue_depth.set(self.depth)  # per batch, not per image: a gauge scraped
            task = asyncio.create_task(self._run_on(replica, batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _run_on(self, replica: int, batch: list[_Item]) -> None:
        try:
            await self._run_batch(batch, replica)
        finally:
            for _ in batch:
                self._queue.task_done()
            self._queue_depth.set(self.depth)
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
        decode_started = time.monotonic()
        try:
            decoded, computing = await asyncio.get_running_loop().run_in_executor(
                self._decode_executors[replica],
                self._decode_then_compute,
                replica,
                [item.payload for item in live],
                [item.deadline for item in live],
            )
        except Exception as exc:  # noqa: BLE001 - a failing batch fails only its own requests
            self._fail(live, exc, "decode")
            return
        for i, exc in decoded.errors.items():  # counted as bad_input where the 400 is sent
            if not live[i].future.done():
                live[i].future.set_exception(exc)
        rows = [live[i] for i in decoded.rows]
        if computing is None:
            return
        try:
            started, finished, cpu_s, keep, probs, (scores, indices) = await asyncio.wrap_future(
                computing
            )
        except Exception as exc:  # noqa: BLE001 - a failing batch fails only its own requests
            self._fail(rows, exc, "inference")
            return
        elapsed = finished - started
        kept = {k: n for n, k in enumerate(keep)}
        for k, item in enumerate(rows):
            if k not in kept:
                self._metrics.rejected.labels(self.name, "deadline").inc()
                if not item.future.done():
                    item.future.set_exception(
                        DeadlineExceeded(f"deadline passed after {started - item.enqueued:.3f}s")
                    )
        if not keep:
            return
        self._last_batch_s = elapsed
        self.computed.images += len(keep)
        self.computed.batches += 1
        self.computed.forward_s += elapsed
        self.computed.forward_cpu_s += cpu_s
        self._metrics.inference.labels(self.name).observe(elapsed)
        self._metrics.batch_size.labels(self.name).observe(len(keep))
        self._metrics.images.labels(self.name).inc(len(keep))
        for k, n in kept.items():
            item, row = rows[k], decoded.rows[k]
            queue_s = decode_started - item.enqueued
            self._queue_wait.observe(queue_s)
            if not item.future.done():
                item.future.set_result(
                    Prediction(
                        probs[n],
                        scores[n],
                        indices[n],
                        queue_s,
                        decoded.seconds,
                        elapsed,
                        len(keep),
                        decoded.decoders.get(row),
                    )
                )

    def _decode_then_compute(
        self, replica: int, payloads: list[Any], deadlines: list[float]
    ) -> tuple[DecodedBatch, Future | None]:
        """On a decode thread: decode the batch, then queue its rows on the replica's
        inference thread at once (None: no row decoded)."""
        decoded = self._decoders[replica](payloads)
        if not decoded.rows:
            return decoded, None
        return decoded, self._executors[replica].submit(
            self._compute,
            self._replicas[replica],
            decoded.inputs,
            [deadlines[i] for i in decoded.rows],
            self.top_k,
        )

    @staticmethod
    def _compute(
        predict: Predict, inputs: torch.Tensor, deadlines: list[float], top_k: int
    ) -> tuple[float, float, float, list[int], Sequence[torch.Tensor], tuple[list, list]]:
        """On the inference thread: drop rows whose deadline passed while the batch waited
        for it (decoded, behind the batch computing), compute the rest, rank their top-k,
        and split the probabilities into rows (the event loop only hands them out). Timed
        here, so the forward's time does not include the loop's delay in reading it."""
        started, cpu_started = time.monotonic(), time.thread_time()
        keep = [k for k, deadline in enumerate(deadlines) if deadline > started]
        if not keep:
            return started, started, 0.0, keep, (), ([], [])
        if len(keep) < len(deadlines):
            inputs = inputs[keep]
        probs = predict(inputs)
        scores, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        rows, top = probs.unbind(0), (scores.tolist(), indices.tolist())
        return started, time.monotonic(), time.thread_time() - cpu_started, keep, rows, top

    def _fail(self, items: list[_Item], exc: Exception, stage: str) -> None:
        log.error("model %s: %s of %d images failed", self.name, stage, len(items), exc_info=exc)
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)
