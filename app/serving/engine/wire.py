"""Frames between HTTP workers and an engine: ``[u32 body size][u8 kind][body]``.

Two kinds of frame go by per image, and both are packed structs: a request (worker to
engine: where the image lies in the worker's arena, what it is, its model and deadline) and
an answer (engine to worker: the :data:`ANSWER_HEAD` fields, the top-k scores and indices,
then the class probabilities as float32). Every worker's images pass through the engine's
one event loop: encoding an answer's floats as JSON cost it more than anything else it did
per image, and a request's JSON header about 2 µs more per image than the struct, on each
side. Control frames (hello, status, an image's error) are rare and carry JSON. Image bytes
never travel here: they stay in the worker's shared-memory arena.
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
from app.serving.decode import DECODER_NAMES, Encoded, Payload, Pixels, Preprocessed
from app.serving.pipeline import ModelUnavailable
from app.serving.preprocess import InputError, Probe
from app.store.errors import UnknownModel

_FRAME = struct.Struct("<IB")  # body size, kind
CONTROL, REQUEST, ANSWER = 0, 1, 2
MAX_FRAME = 64 * 1024 * 1024
READ_CHUNK = 1 << 20  # a reader takes what has arrived, up to this, and parses every frame in it

# id, deadline, arena offset, bytes, the model name's bytes; the name and the payload's form
# follow: its kind (an index of PAYLOADS), then PROBE and the format's name for encoded
# bytes, or TENSOR and one u32 per dimension for a tensor
REQUEST_HEAD = struct.Struct("<qdQIH")
PAYLOADS = (Encoded, Preprocessed, Pixels, torch.Tensor)
_KIND = {kind: bytes((i,)) for i, kind in enumerate(PAYLOADS)}
PROBE = struct.Struct("<II?")  # width, height, nvjpeg_ok
TENSOR = struct.Struct("<BB")  # dtype (an index of DTYPES), dimensions
DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)
# id, queue_s, decode_s, inference_s, batch size, decoder, k (scores and indices follow)
ANSWER_HEAD = struct.Struct("<qdddIBB")
# an answer's decoder, by its index here (None: decoded before it queued)
DECODERS = (None, *DECODER_NAMES)


class EngineUnavailable(Exception):
    """The engine is down (restarting) or went away mid-request: HTTP 503, never a hang."""


def _frame(kind: int, *parts: bytes | memoryview) -> bytes:
    return b"".join((_FRAME.pack(sum(map(len, parts)), kind), *parts))


_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def control(header: dict[str, Any]) -> bytes:
    """A control frame: hello, status or an image's error."""
    return _frame(CONTROL, _encode_json(header).encode())


def read_control(body: bytes) -> dict[str, Any]:
    return json.loads(body)


# ---- requests ---------------------------------------------------------------------------
def describe(payload: Payload) -> tuple[bytes | memoryview, bytes]:
    """What of ``payload`` goes into the arena, and its form: what the engine needs to
    rebuild it around those bytes."""
    if isinstance(payload, Encoded):
        p = payload.probe
        probe = PROBE.pack(p.width, p.height, p.nvjpeg_ok)
        return payload.data, b"".join((_KIND[Encoded], probe, p.format.encode()))
    kind = torch.Tensor if isinstance(payload, torch.Tensor) else type(payload)
    tensor = payload if kind is torch.Tensor else payload.tensor
    array = tensor.detach().contiguous().cpu().numpy()
    head = TENSOR.pack(DTYPES.index(tensor.dtype), array.ndim)
    form = b"".join((_KIND[kind], head, struct.pack(f"<{array.ndim}I", *array.shape)))
    return memoryview(array).cast("B"), form


def rebuild(form: bytes, data: bytearray) -> Payload:
    """The payload ``describe`` gave ``form`` for, around its bytes ``data``."""
    kind = PAYLOADS[form[0]]
    if kind is Encoded:
        width, height, nvjpeg_ok = PROBE.unpack_from(form, 1)
        return Encoded(data, Probe(form[1 + PROBE.size :].decode(), width, height, nvjpeg_ok))
    dtype, dims = TENSOR.unpack_from(form, 1)
    shape = struct.unpack_from(f"<{dims}I", form, 1 + TENSOR.size)
    tensor = torch.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)
    return tensor if kind is torch.Tensor else kind(tensor)


def request_frame(
    rid: int, model: str, deadline: float, offset: int, size: int, form: bytes
) -> bytes:
    """One image's request: ``size`` bytes at ``offset`` in the worker's arena."""
    name = model.encode()
    return _frame(REQUEST, REQUEST_HEAD.pack(rid, deadline, offset, size, len(name)), name, form)


def read_request(body: bytes) -> tuple[int, str, float, int, int, bytes]:
    """A request's id, model, deadline, arena offset and size, and its payload's form;
    ``ConnectionError`` for a body that is none (a worker that sends one is broken)."""
    try:
        rid, deadline, offset, size, name_size = REQUEST_HEAD.unpack_from(body)
        name_end = REQUEST_HEAD.size + name_size
        model = body[REQUEST_HEAD.size : name_end].decode()
    except (struct.error, UnicodeDecodeError) as exc:
        raise ConnectionError(f"malformed request frame: {exc}") from exc
    return rid, model, deadline, offset, size, body[name_end:]


# ---- answers ----------------------------------------------------------------------------
def answer_frame(request_id: int, p: Prediction) -> bytes:
    """An image's answer: its prediction packed, probabilities as they are (float32, CPU)."""
    k = len(p.top_indices)
    fields = ANSWER_HEAD.pack(
        request_id,
        p.queue_s,
        p.decode_s,
        p.inference_s,
        p.batch_size,
        DECODERS.index(p.decoder),
        k,
    )
    top = struct.pack(f"<{k}f{k}q", *p.top_scores, *p.top_indices)
    return _frame(ANSWER, fields, top, memoryview(p.probs.numpy()).cast("B"))


def read_answer(body: bytes) -> tuple[int, Prediction]:
    """The request id and prediction of an answer frame's body."""
    rid, queue_s, decode_s, inference_s, batch_size, decoder, k = ANSWER_HEAD.unpack_from(body)
    top = struct.unpack_from(f"<{k}f{k}q", body, ANSWER_HEAD.size)
    start = ANSWER_HEAD.size + 12 * k
    probs = torch.from_numpy(np.frombuffer(body, np.float32, offset=start).copy())
    scores, indices = list(top[:k]), list(top[k:])
    return rid, Prediction(
        probs, scores, indices, queue_s, decode_s, inference_s, batch_size, DECODERS[decoder]
    )


# ---- reading ----------------------------------------------------------------------------
def _checked(size: int, kind: int) -> None:
    if size > MAX_FRAME or kind > ANSWER:
        raise ConnectionError(f"malformed frame: {size} bytes, kind {kind}")


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame's kind and body; ``asyncio.IncompleteReadError`` when the other side
    closed. For one frame (a hello); a stream of them: :class:`FrameReader`."""
    size, kind = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    _checked(size, kind)
    return kind, await reader.readexactly(size)


class FrameReader:
    """Every frame that has arrived, per wake-up: under load one read brings many, and they
    are parsed in one go instead of two awaits each."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()

    async def frames(self) -> list[tuple[int, bytes]]:
        """The frames (kind, body) complete so far, at least one;
        ``asyncio.IncompleteReadError`` when the other side closed."""
        while True:
            data = await self._reader.read(READ_CHUNK)
            if not data:
                raise asyncio.IncompleteReadError(bytes(self._buffer), None)
            self._buffer += data
            if found := self._parse():
                return found

    def _parse(self) -> list[tuple[int, bytes]]:
        buffer, found, at = self._buffer, [], 0
        with memoryview(buffer) as view:  # released before the buffer shrinks
            while len(buffer) - at >= _FRAME.size:
                size, kind = _FRAME.unpack_from(buffer, at)
                _checked(size, kind)
                start = at + _FRAME.size
                if len(buffer) - start < size:
                    break
                found.append((kind, bytes(view[start : start + size])))
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
