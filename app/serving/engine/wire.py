"""Frames between HTTP workers and an engine: ``[u32 size][u32 header size][JSON][blob]``.

Control frames and requests carry a small JSON header (an image's place in the arena, its
probe, its deadline). Answers, the one frame the engine sends per image, carry no JSON: a
header size of 0 marks one, and its blob is the packed :data:`ANSWER` fields, the top-k
scores and indices, then the class probabilities (float32). Encoding floats as JSON cost
the engine's event loop more than everything else it does per image. Image bytes never
travel here: they stay in the worker's shared-memory arena.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from typing import Any

import numpy as np
import torch

from app.serving.batcher import BatcherStopped, DeadlineExceeded, Prediction, QueueFull
from app.serving.pipeline import ModelUnavailable
from app.serving.preprocess import InputError
from app.store.errors import UnknownModel

_SIZES = struct.Struct("<II")
MAX_FRAME = 64 * 1024 * 1024
READ_CHUNK = 1 << 20  # a reader takes what has arrived, up to this, and parses every frame in it
# id, queue_s, decode_s, inference_s, batch size, decoder, k (scores and indices follow)
ANSWER = struct.Struct("<qdddIBB")
# an answer's decoder, by index: new names go at the end (a worker and its engine may differ)
DECODERS = (None, "nvjpeg", "pillow", "hardware", "nvimgcodec")


class EngineUnavailable(Exception):
    """The engine is down (restarting) or went away mid-request: HTTP 503, never a hang."""


_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def frame(header: dict[str, Any], blob: bytes | memoryview = b"") -> bytes:
    head = _encode_json(header).encode()
    return b"".join((_SIZES.pack(len(head) + len(blob), len(head)), head, blob))


def answer_frame(request_id: int, p: Prediction) -> bytes:
    """An image's answer: its prediction packed, probabilities as they are (float32, CPU)."""
    k = len(p.top_indices)
    fields = ANSWER.pack(
        request_id,
        p.queue_s,
        p.decode_s,
        p.inference_s,
        p.batch_size,
        DECODERS.index(p.decoder),
        k,
    )
    top = struct.pack(f"<{k}f{k}q", *p.top_scores, *p.top_indices)
    probs = memoryview(p.probs.numpy()).cast("B")
    size = len(fields) + len(top) + len(probs)
    return b"".join((_SIZES.pack(size, 0), fields, top, probs))


def read_answer(blob: bytes) -> tuple[int, Prediction]:
    """The request id and prediction of an answer frame's blob."""
    rid, queue_s, decode_s, inference_s, batch_size, decoder, k = ANSWER.unpack_from(blob)
    top = struct.unpack_from(f"<{k}f{k}q", blob, ANSWER.size)
    start = ANSWER.size + 12 * k
    probs = torch.from_numpy(np.frombuffer(blob, np.float32, offset=start).copy())
    scores, indices = list(top[:k]), list(top[k:])
    return rid, Prediction(
        probs, scores, indices, queue_s, decode_s, inference_s, batch_size, DECODERS[decoder]
    )


def _split(body: bytes | memoryview, head_size: int) -> tuple[dict[str, Any] | None, bytes]:
    head = json.loads(bytes(body[:head_size])) if head_size else None
    return head, bytes(body[head_size:])


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any] | None, bytes]:
    """The next frame (header None: an answer); ``asyncio.IncompleteReadError`` when the
    other side closed. For one frame (a hello); a stream of them: :class:`FrameReader`."""
    size, head_size = _SIZES.unpack(await reader.readexactly(_SIZES.size))
    if size > MAX_FRAME or head_size > size:
        raise ConnectionError(f"malformed frame: {size} bytes, header {head_size}")
    return _split(await reader.readexactly(size), head_size)


class FrameReader:
    """Every frame that has arrived, per wake-up: under load one read brings many, and they
    are parsed in one go instead of two awaits each."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()

    async def frames(self) -> list[tuple[dict[str, Any] | None, bytes]]:
        """The frames complete so far (at least one); ``asyncio.IncompleteReadError`` when
        the other side closed."""
        while True:
            data = await self._reader.read(READ_CHUNK)
            if not data:
                raise asyncio.IncompleteReadError(bytes(self._buffer), None)
            self._buffer += data
            if found := self._parse():
                return found

    def _parse(self) -> list[tuple[dict[str, Any] | None, bytes]]:
        buffer, found, at = self._buffer, [], 0
        with memoryview(buffer) as view:  # released before the buffer shrinks
            while len(buffer) - at >= _SIZES.size:
                size, head_size = _SIZES.unpack_from(buffer, at)
                if size > MAX_FRAME or head_size > size:
                    raise ConnectionError(f"malformed frame: {size} bytes, header {head_size}")
                start = at + _SIZES.size
                if len(buffer) - start < size:
                    break
                found.append(_split(view[start : start + size], head_size))
                at = start + size
        del buffer[:at]
        return found


class FrameWriter:
    """Coalesces the frames written in one event-loop turn into one send: under load many
    answers (or requests) leave together instead of a syscall each."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []

    def send(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        data, self._pending = b"".join(self._pending), []
        if not self._writer.is_closing():
            self._writer.write(data)

    async def close(self) -> None:
        self._flush()
        self._writer.close()
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await self._writer.wait_closed()


# ---- errors: raised in the engine, raised again in the worker as the same type -------
RAISED_AGAIN = (DeadlineExceeded, BatcherStopped, ModelUnavailable, UnknownModel)


def encode_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, QueueFull):
        return {"type": "QueueFull", "model": exc.model, "retry_after_s": exc.retry_after_s}
    if isinstance(exc, InputError):
        return {
            "type": "InputError",
            "message": str(exc),
            "status": exc.status,
            "code": exc.code,
        }
    for known in RAISED_AGAIN:
        if isinstance(exc, known):
            return {"type": known.__name__, "message": str(exc)}
    return {"type": "EngineError", "message": f"{type(exc).__name__}: {exc}"}


def decode_error(err: dict[str, Any]) -> Exception:
    kind, message = err["type"], err.get("message", "")
    if kind == "QueueFull":
        return QueueFull(err["model"], err["retry_after_s"])
    if kind == "InputError":
        exc = InputError(message)
        exc.status, exc.code = err["status"], err["code"]
        return exc
    for known in RAISED_AGAIN:
        if kind == known.__name__:
            return known(message)
    return RuntimeError(message)
