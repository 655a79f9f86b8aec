"""Shadow mode: what a primary model served on /classify also runs on a shadow model.

The copy runs as a fire-and-forget task after the primary's response is ready, so it
never delays or fails that response. It is bounded twice: at most
``shadow_max_pending`` shadow requests at once, and a copy only enters the shadow's
queue while that queue is below ``shadow_queue_fraction`` of its capacity (the rest is
left for the shadow model's own traffic). What does not fit is dropped and counted by
reason; what runs is compared image by image with the primary's answer and recorded as
agreement metrics (``mode="shadow"``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from app.config import Settings
from app.experiments.agreement import agreement
from app.experiments.compare import all_or_nothing
from app.serving.metrics import Metrics
from app.serving.pipeline import (
    ClassifyPipeline,
    ImageInput,
    ImageResult,
    ModelUnavailable,
)
from app.serving.pool import ServedModel

log = logging.getLogger(__name__)


class ShadowTraffic:
    def __init__(self, settings: Settings, pipeline: ClassifyPipeline, metrics: Metrics) -> None:
        self.pairs = dict(settings.shadow)
        self._pipeline, self._metrics = pipeline, metrics
        self._max_pending = settings.shadow_max_pending
        self._queue_limit = max(1, int(settings.shadow_queue_fraction * settings.queue_size))
        self._timeout_s = settings.request_timeout_s
        self._pending: set[asyncio.Task[None]] = set()
        for primary, shadow in self.pairs.items():
            metrics.declare_pair("shadow", primary, shadow)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def mirror(
        self, primary: ServedModel, images: list[ImageInput], results: list[ImageResult]
    ) -> None:
        """Start the shadow copy of a request ``primary`` served, if it has a shadow, and
        return at once. Keeps a reference to the task: the loop holds only weak ones."""
        shadow = self.pairs.get(primary.name)
        if shadow is None:
            return
        try:
            model = self._pipeline.serving(shadow)
        except ModelUnavailable:
            self._drop(primary.name, shadow, "unavailable", len(results))
            return
        if len(self._pending) >= self._max_pending:
            self._drop(primary.name, shadow, "overloaded", len(results))
            return
        if not self._has_room(model, len(results)):
            self._drop(primary.name, shadow, "queue_full", len(results))
            return
        task = asyncio.create_task(
            self._run(primary, model, images, results), name=f"shadow-{shadow}"
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _has_room(self, model: ServedModel, images: int) -> bool:
        return model.batcher.depth + images <= self._queue_limit

    async def close(self) -> None:
        """At shutdown: cancel copies still running (nobody waits for their answer)."""
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    async def _run(
        self,
        primary: ServedModel,
        model: ServedModel,
        images: list[ImageInput],
        results: list[ImageResult],
    ) -> None:
        pair = (primary.name, model.name)
        try:
            payloads = [self._pipeline.probe(model, im) for im in images]  # its own limits
            deadline = time.monotonic() + self._timeout_s
            copies = await all_or_nothing(
                self._pipeline.infer(model, im, p, 1, deadline)
                for im, p in zip(images, payloads, strict=True)
            )
        except Exception as exc:  # noqa: BLE001 - a shadow failure must stay invisible
            log.warning("shadow copy %s -> %s failed: %s", *pair, exc)
            self._drop(*pair, "failed", len(results))
            return
        for served, copy in zip(results, copies, strict=True):
            self._metrics.record_agreement("shadow", *pair, agreement(served.probs, copy.probs))

    def _drop(self, primary: str, shadow: str, reason: str, images: int) -> None:
        self._metrics.shadow_dropped.labels(primary, shadow, reason).inc(images)
