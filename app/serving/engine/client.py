"""An HTTP worker's side of the engine: one link per engine, and the batcher it presents.

A link reconnects by itself. While its engine is down every call fails at once with
:class:`EngineUnavailable` (HTTP 503), and a request in flight when the engine died fails
the same way: no request waits on an engine that will not answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.serving.batcher import Prediction
from app.serving.decode import Payload
from app.serving.engine.arena import ShmArena
from app.serving.engine.wire import (
    ANSWER,
    CONTROL,
    EngineUnavailable,
    FrameReader,
    FrameWriter,
    control,
    decode_error,
    describe,
    read_answer,
    read_control,
    request_frame,
)

log = logging.getLogger(__name__)

RECONNECT_S = 0.2
# Past its deadline the engine answers 504 itself; this is only for an engine that hangs.
ANSWER_GRACE_S = 5.0


class EngineLink:
    """One worker's connection to one engine, kept up across engine restarts."""

    def __init__(
        self, socket_path: Path, arena: ShmArena, on_status: Callable[[], None] = lambda: None
    ) -> None:
        """``on_status``: called whenever the engine's word changes (a status frame, or the
        link going down)."""
        self.socket_path, self.arena, self.on_status = socket_path, arena, on_status
        self.status: dict[str, Any] | None = None  # the engine's last word; None while down
        self._out: FrameWriter | None = None
        self._pending: dict[int, tuple[asyncio.Future, int]] = {}  # id -> (answer, region)
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self.restarts = -1  # connections made, less the first

    @property
    def up(self) -> bool:
        return self._out is not None and self.status is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"engine-link-{self.socket_path}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            out = FrameWriter(writer)
            out.send(control({"op": "hello", "arena": self.arena.name, "pid": os.getpid()}))
            self._out = out
            self.restarts += 1
            frames = FrameReader(reader)
            try:
                while True:
                    for kind, body in await frames.frames():
                        if kind == ANSWER:
                            self._answer(*read_answer(body))
                        elif kind != CONTROL:
                            raise ConnectionError(f"the engine sent a frame of kind {kind}")
                        elif (head := read_control(body)).get("op") == "status":
                            self.status = head
                            self.on_status()
                        else:
                            self._fail(head["id"], decode_error(head["error"]))
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("engine at %s went away", self.socket_path)
            except Exception:  # noqa: BLE001 - a frame it cannot take must not end the link
                log.exception("engine link %s failed; reconnecting", self.socket_path)
            finally:
                self._out, self.status = None, None
                self.on_status()
                self._fail_pending()
                await out.close()
            await asyncio.sleep(RECONNECT_S)

    def _settle(self, rid: int) -> asyncio.Future[Prediction] | None:
        """The request's future, its region freed; None where nobody waits any more."""
        pending = self._pending.pop(rid, None)
        if pending is None:
            return None
        future, region = pending
        self.arena.free(region)
        return None if future.done() else future  # done: cancelled (the client went away)

    def _answer(self, rid: int, prediction: Prediction) -> None:
        if future := self._settle(rid):
            future.set_result(prediction)

    def _fail(self, rid: int, exc: Exception) -> None:
        if future := self._settle(rid):
            future.set_exception(exc)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future, region in pending.values():
            self.arena.free(region)
            if not future.done():
                future.set_exception(
                    EngineUnavailable("the engine stopped while computing this image")
                )

    async def infer(self, model: str, payload: Payload, deadline: float) -> Prediction:
        if not self.up:
            raise EngineUnavailable("the engine is down (being restarted)")
        data, form = describe(payload)
        region = await self.arena.put(data, deadline)
        if self._out is None:  # went down while waiting for arena space
            self.arena.free(region)
            raise EngineUnavailable("the engine is down (being restarted)")
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, region)
        self._out.send(request_frame(rid, model, deadline, region, len(data), form))
        timeout = max(0.0, deadline - time.monotonic()) + ANSWER_GRACE_S
        # A timer rather than asyncio.wait_for, whose waiter and callbacks cost the worker
        # more per image; the region stays the engine's until it answers after all.
        timer = asyncio.get_running_loop().call_later(timeout, self._unanswered, future, timeout)
        try:
            return await future
        finally:
            timer.cancel()

    @staticmethod
    def _unanswered(future: asyncio.Future, timeout: float) -> None:
        if not future.done():
            future.set_exception(
                EngineUnavailable(f"the engine did not answer within {timeout:.0f} s")
            )


class RemoteBatcher:
    """What the request path sees of a model served by engines: ``submit`` and ``depth``,
    as :class:`~app.serving.batcher.DynamicBatcher` offers in process."""

    def __init__(self, name: str, links: Sequence[EngineLink]) -> None:
        self.name, self._links = name, list(links)

    def _ready_links(self) -> list[EngineLink]:
        return [
            link
            for link in self._links
            if link.up and link.status["models"].get(self.name, {}).get("state") == "ready"
        ]

    async def submit(self, payload: Payload, deadline: float) -> Prediction:
        links = self._ready_links() or self._links  # none ready: the link says why
        link = min(links, key=lambda link: link.in_flight)  # one engine per device
        return await link.infer(self.name, payload, deadline)

    @property
    def depth(self) -> int:
        return sum(
            link.status["models"].get(self.name, {}).get("depth", 0)
            for link in self._links
            if link.up
        )
