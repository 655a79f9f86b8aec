"""Frames between HTTP workers and an engine: ``[u32 size][u32 header size][JSON][blob]``.

The JSON header is small (an image's place in the arena, its probe, its deadline; an answer's
top-k and timings). The blob carries what is big and binary: an answer's class
probabilities (float32), so they never pass through JSON. Image bytes never travel here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from typing import Any

from app.serving.batcher import BatcherStopped, DeadlineExceeded, QueueFull
from app.serving.pipeline import ModelUnavailable
from app.serving.preprocess import InputError
from app.store.errors import UnknownModel

_SIZES = struct.Struct("<II")
MAX_FRAME = 64 * 1024 * 1024


class EngineUnavailable(Exception):
    """The engine is down (restarting) or went away mid-request: HTTP 503, never a hang."""


def frame(header: dict[str, Any], blob: bytes | memoryview = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((_SIZES.pack(len(head) + len(blob), len(head)), head, blob))


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The next frame; ``asyncio.IncompleteReadError`` when the other side closed."""
    size, head_size = _SIZES.unpack(await reader.readexactly(_SIZES.size))
    if size > MAX_FRAME or head_size > size:
        raise ConnectionError(f"malformed frame: {size} bytes, header {head_size}")
    body = await reader.readexactly(size)
    return json.loads(body[:head_size]), body[head_size:]


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
