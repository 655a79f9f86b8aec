"""The engine: one process per device that owns the models and answers every HTTP worker.

It is the in-process model pool (store → runners with CUDA graphs → one dynamic batcher and
decode stage per model) behind a Unix socket. Each worker connects once, names its
shared-memory arena, and sends one small frame per image; the engine reads the image out of
the arena, queues it with every other worker's images of that model, and answers with the
image's top-k, timings and probabilities.

Its event loop carries every image of every worker, so what it does per image is kept to a
parse, a queue and a packed answer: frames are read in bulk, an image's answer is sent from
its future's callback (no task per image), and the GIL is handed over often enough that the
decode and inference threads are not kept waiting behind the loop (:data:`SWITCH_INTERVAL_S`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict
from functools import partial
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

from app.config import Settings
from app.serving.batcher import Prediction
from app.serving.decode import Payload
from app.serving.engine.arena import attach
from app.serving.engine.wire import (
    CONTROL,
    REQUEST,
    FrameReader,
    FrameWriter,
    answer_frame,
    control,
    encode_error,
    read_control,
    read_frame,
    read_request,
    rebuild,
)
from app.serving.metrics import Metrics
from app.serving.pipeline import ModelUnavailable
from app.serving.pool import ModelPool, ModelState
from app.store import ModelStore

log = logging.getLogger(__name__)

STATUS_EVERY_S = 0.5  # how stale a worker's view of model states and queue depths may be
# CPython's default is 5 ms: a decode thread back from a GPU call would wait that long for the
# GIL while the event loop runs Python, several times per batch.
SWITCH_INTERVAL_S = 0.0005


def read_payload(form: bytes, offset: int, size: int, shm: SharedMemory) -> Payload:
    """The payload a request points at, copied out of the worker's arena (the region is
    the worker's again once the image is answered, and a batch may outlive that)."""
    # a bytearray: writable, so nvjpeg and torch.frombuffer take it without another copy
    return rebuild(form, bytearray(shm.buf[offset : offset + size]))


class EngineServer:
    def __init__(self, settings: Settings, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.metrics = Metrics()
        self.pool = ModelPool(
            settings, ModelStore(settings.store_dir), self.metrics, reports_worker_ready=False
        )
        self._writers: set[FrameWriter] = set()
        self._pending: set[asyncio.Future[Prediction]] = set()  # images queued, not answered

    def status(self) -> dict[str, Any]:
        models = {
            m.name: {
                "state": m.state.value,
                "reason": m.reason,
                "devices": m.devices,
                "dtype": m.dtype,
                "depth": m.batcher.depth if m.batcher else 0,
                "computed": asdict(m.batcher.computed) if m.batcher else None,
            }
            for m in self.pool.models.values()
        }
        return {"op": "status", "pid": os.getpid(), "models": models}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        # Ctrl+C in a terminal reaches every process of the group: the HTTP workers drain
        # first, and the supervisor stops the engine after them.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.socket_path.unlink(missing_ok=True)
        await self.pool.start()
        server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        log.info("engine %d listening on %s", os.getpid(), self.socket_path)
        broadcaster = asyncio.create_task(self._broadcast_status())
        await stop.wait()
        log.info("engine stopping: finishing queued images")
        server.close()
        await self.pool.stop()
        await asyncio.gather(*self._pending, return_exceptions=True)
        broadcaster.cancel()
        for writer in list(self._writers):
            await writer.close()
        self.socket_path.unlink(missing_ok=True)
        self.metrics.process_exiting()

    async def _broadcast_status(self) -> None:
        while True:
            data = control(self.status())
            for writer in self._writers:
                writer.send(data)
            await asyncio.sleep(STATUS_EVERY_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        out = FrameWriter(writer)
        shm: SharedMemory | None = None
        try:
            kind, body = await read_frame(reader)
            if kind != CONTROL:
                raise ConnectionError(f"a worker's first frame must be its hello, not {kind}")
            shm = attach(read_control(body)["arena"])
            self._writers.add(out)
            out.send(control(self.status()))
            frames = FrameReader(reader)
            while True:
                for kind, body in await frames.frames():
                    if kind != REQUEST:
                        raise ConnectionError(f"a worker sent a frame of kind {kind}")
                    self._submit(body, shm, out)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker went away; its queued images still run, their answers are lost
        finally:
            self._writers.discard(out)
            if shm is not None:
                shm.close()

    def _submit(self, body: bytes, shm: SharedMemory, out: FrameWriter) -> None:
        """Queue one image; its answer (or error) goes back from its future's callback."""
        rid, name, deadline, offset, size, form = read_request(body)
        try:
            payload = read_payload(form, offset, size, shm)
            model = self.pool.get(name)
            if model.state is not ModelState.READY:
                raise ModelUnavailable(f"model {model.name!r} is {model.state}")
            future = model.batcher.enqueue(payload, deadline)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its request
            out.send(control({"id": rid, "error": encode_error(exc)}))
            return
        self._pending.add(future)
        future.add_done_callback(partial(self._answer, rid, out))

    def _answer(self, rid: int, out: FrameWriter, future: asyncio.Future[Prediction]) -> None:
        self._pending.discard(future)
        if future.cancelled():
            return
        if (exc := future.exception()) is not None:
            out.send(control({"id": rid, "error": encode_error(exc)}))
        else:
            out.send(answer_frame(rid, future.result()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.serving.engine")
    parser.add_argument("--socket", type=Path, required=True)
    args = parser.parse_args(argv)
    # The supervisor hands the engine the server's settings whole (flags included).
    settings = Settings(**json.loads(os.environ.get("VITSERVE_ENGINE_SETTINGS", "{}")))
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s engine[{os.getpid()}] %(name)s: %(message)s",
    )
    started = time.monotonic()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:  # one event loop carries every worker's images: the faster one where installed
        from uvloop import run
    except ImportError:
        run = asyncio.run
    run(EngineServer(settings, args.socket).run())
    log.info("engine stopped after %.0f s", time.monotonic() - started)
    return 0
