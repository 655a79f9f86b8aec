"""The engine: HTTP workers hand images over shared memory to one engine process per device,
which is restarted when it dies while the workers answer 503 instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app.bench.server import running_server
from app.serving.batcher import BatcherStopped, DeadlineExceeded, Prediction, QueueFull
from app.serving.decode import DECODER_NAMES, Encoded, Pixels, Preprocessed
from app.serving.engine import client
from app.serving.engine.arena import ShmArena, attach
from app.serving.engine.client import EngineLink
from app.serving.engine.server import read_payload
from app.serving.engine.wire import (
    ANSWER,
    CONTROL,
    REQUEST,
    EngineUnavailable,
    FrameReader,
    answer_frame,
    control,
    decode_error,
    describe,
    encode_error,
    read_answer,
    read_control,
    read_frame,
    read_request,
    rebuild,
    request_frame,
)
from app.serving.pipeline import ModelUnavailable
from app.serving.preprocess import ImageTooLarge, InputError, Probe
from app.store import ModelStore
from app.store.errors import UnknownModel
from tests.helpers import add_tiny_entry, image_bytes, serve_env

JPEG = {"content-type": "image/jpeg"}


# ---- the arena ----------------------------------------------------------------------
@pytest.fixture
def arena():
    arena = ShmArena(1000)
    yield arena
    arena.close()


def test_arena_hands_out_regions_in_ring_order_and_reclaims_only_behind_the_oldest(arena):
    a, b, c = arena.allocate(400), arena.allocate(400), arena.allocate(150)
    assert (a, b, c) == (0, 400, 800)
    assert arena.allocate(100) is None  # 50 bytes left at the end, none at the start
    arena.free(b)  # answered out of order: a still holds the start of the ring
    assert arena.allocate(100) is None
    arena.free(a)  # now the ring's start is free: the next region wraps around
    assert arena.allocate(700) == 0
    assert arena.allocate(150) is None  # would overrun c, still live at 800
    assert arena.allocate(100) == 700  # fits exactly up to c
    arena.free(c)
    arena.free(0)
    arena.free(700)
    assert arena.used == 0 and arena.allocate(1000) == 0


async def test_a_full_arena_waits_for_space_then_gives_up_at_the_deadline(arena):
    region = await arena.put(b"x" * 900, time.monotonic() + 1)
    waiting = asyncio.create_task(arena.put(b"y" * 200, time.monotonic() + 5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    arena.free(region)
    assert await asyncio.wait_for(waiting, 1) == 0
    with pytest.raises(DeadlineExceeded):
        await arena.put(b"z" * 900, time.monotonic() + 0.05)


def test_the_engine_reads_what_the_worker_wrote(arena):
    region = arena.allocate(5)
    arena.shm.buf[region : region + 5] = b"hello"
    view = attach(arena.name)
    try:
        assert bytes(view.buf[region : region + 5]) == b"hello"
    finally:
        view.close()


# ---- the wire -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc",
    [
        QueueFull("m", 3.0),
        DeadlineExceeded("late"),
        BatcherStopped("stopping"),
        ModelUnavailable("loading"),
        UnknownModel("who?"),
    ],
)
def test_errors_raised_in_the_engine_are_raised_again_as_the_same_kind(exc):
    again = decode_error(encode_error(exc))
    assert type(again) is type(exc) and str(again) == str(exc)


def prediction(k: int = 3, classes: int = 10, decoder: str | None = "nvjpeg") -> Prediction:
    probs = torch.softmax(torch.randn(100, classes), -1)[37]  # a row of a batch, as served
    scores, indices = probs.topk(k)
    return Prediction(probs, scores.tolist(), indices.tolist(), 0.001, 0.002, 0.003, 100, decoder)


@pytest.mark.parametrize("decoder", [None, *DECODER_NAMES])
def test_an_answer_is_packed_without_json_and_read_back_whole(decoder):
    sent = prediction(decoder=decoder)
    data = answer_frame(41, sent)
    size, kind = struct.unpack_from("<IB", data)
    assert kind == ANSWER and size == len(data) - 5  # packed, no JSON
    rid, got = read_answer(data[5:])
    assert rid == 41
    assert got.top_indices == sent.top_indices and got.decoder == decoder
    assert got.top_scores == pytest.approx(sent.top_scores)  # float32 on the wire
    assert (got.queue_s, got.decode_s, got.inference_s, got.batch_size) == (
        0.001,
        0.002,
        0.003,
        100,
    )
    assert torch.equal(got.probs, sent.probs)


async def test_the_reader_parses_every_frame_that_arrived_however_the_bytes_were_cut():
    frames = [control({"op": "status", "n": "x" * i}) for i in range(3)]
    frames.append(answer_frame(5, prediction()))
    stream = b"".join(frames)
    reader = asyncio.StreamReader()
    frames_reader = FrameReader(reader)
    reader.feed_data(stream[:3])  # not even one frame's sizes yet
    reader.feed_data(stream[3:-10])  # all but the end of the answer
    first = await frames_reader.frames()
    assert [(kind, read_control(body)["n"]) for kind, body in first] == [
        (CONTROL, ""),
        (CONTROL, "x"),
        (CONTROL, "xx"),
    ]
    reader.feed_data(stream[-10:])
    ((kind, body),) = await frames_reader.frames()
    assert kind == ANSWER and read_answer(body)[0] == 5
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await frames_reader.frames()


@pytest.mark.parametrize(
    "sizes", [struct.pack("<IB", 10, 9), struct.pack("<IB", 1 << 30, REQUEST)], ids=["kind", "size"]
)
async def test_a_malformed_frame_ends_the_connection(sizes):
    reader = asyncio.StreamReader()
    reader.feed_data(sizes + b"0" * 10)
    with pytest.raises(ConnectionError, match="malformed"):
        await FrameReader(reader).frames()


def test_a_request_frame_reads_back_as_sent_and_a_cut_one_ends_the_connection():
    body = request_frame(7, "deit_small-merge-t5", 123.25, 4096, 110_000, b"form")[5:]
    assert read_request(body) == (7, "deit_small-merge-t5", 123.25, 4096, 110_000, b"form")
    with pytest.raises(ConnectionError, match="malformed"):
        read_request(body[:10])


def test_an_input_error_keeps_its_status_and_code_and_a_full_queue_its_retry_time():
    again = decode_error(encode_error(ImageTooLarge("big")))
    assert isinstance(again, InputError) and (again.status, again.code) == (413, "image_too_large")
    assert decode_error(encode_error(QueueFull("m", 3.0))).retry_after_s == 3.0


@contextlib.asynccontextmanager
async def link_to(engine, tmp_path: Path) -> AsyncIterator[tuple[EngineLink, ShmArena]]:
    """A worker's link, up, to ``engine`` (a unix-socket handler playing the engine), and
    the arena it hands images through."""
    path = tmp_path / "engine.sock"
    server = await asyncio.start_unix_server(engine, path=str(path))
    arena = ShmArena(1 << 20)
    link = EngineLink(path, arena)
    link.start()
    try:
        while not link.up:
            await asyncio.sleep(0.01)
        yield link, arena
    finally:
        await link.stop()
        server.close()
        arena.close()


async def test_a_request_frame_carries_where_the_image_is_not_the_image(tmp_path):
    """Image bytes go through shared memory: the frame on the socket stays small whatever
    the image's size, and the engine finds the exact bytes in the worker's arena."""
    data = os.urandom(200_000)
    payload = Encoded(data, Probe("JPEG", 640, 480, True))
    seen: list[int] = []

    async def engine(reader, writer):
        _, hello = await read_frame(reader)
        shm = attach(read_control(hello)["arena"])
        status = {"op": "status", "pid": 1, "models": {"m": {"state": "ready"}}}
        writer.write(control(status))
        kind, body = await read_frame(reader)
        seen.append(len(body))
        rid, model, _, offset, size, form = read_request(body)
        assert (kind, model) == (REQUEST, "m")
        assert bytes(shm.buf[offset : offset + size]) == data
        assert read_payload(form, offset, size, shm).probe == payload.probe
        probs = torch.from_numpy(np.full(10, 0.1, np.float32))
        writer.write(answer_frame(rid, Prediction(probs, [0.9], [7], 0, 0, 0, 1, "pillow")))
        await writer.drain()
        shm.close()

    async with link_to(engine, tmp_path) as (link, arena):
        prediction = await link.infer("m", payload, time.monotonic() + 5)
        assert arena.used == 0  # the answer freed the image's region
    assert prediction.top_indices == [7] and prediction.probs.shape == (10,)
    assert seen and seen[0] < 1024


async def test_an_engine_that_never_answers_fails_the_request_after_deadline_and_grace(
    tmp_path, monkeypatch
):
    """A hung (or stopped) engine that took an image: the request fails as unavailable (503)
    once its deadline and the grace have passed, never a hang, and the image's region stays
    the engine's until it answers after all."""
    monkeypatch.setattr(client, "ANSWER_GRACE_S", 0.2)
    answer_now = asyncio.Event()

    async def engine(reader, writer):
        await read_frame(reader)  # hello
        writer.write(control({"op": "status", "pid": 1, "models": {"m": {"state": "ready"}}}))
        _, body = await read_frame(reader)
        await answer_now.wait()
        probs = torch.from_numpy(np.full(10, 0.1, np.float32))
        writer.write(
            answer_frame(read_request(body)[0], Prediction(probs, [0.9], [7], 0, 0, 0, 1, None))
        )
        await writer.drain()

    async with link_to(engine, tmp_path) as (link, arena):
        started = time.monotonic()
        payload = Encoded(b"x" * 1000, Probe("JPEG", 64, 48, True))
        with pytest.raises(EngineUnavailable, match="did not answer"):
            await link.infer("m", payload, started + 0.1)
        assert 0.3 <= time.monotonic() - started < 2
        assert arena.used == 1  # the engine may still read the image
        answer_now.set()
        while arena.used:
            assert time.monotonic() - started < 5, "the late answer never freed the region"
            await asyncio.sleep(0.01)


async def test_a_frame_the_link_cannot_take_drops_the_connection_not_the_link(tmp_path):
    """A malformed frame (here an error frame without an id) ends that connection, which
    the link logs and makes again: a worker never stays cut off from a live engine."""
    connections = 0

    async def engine(reader, writer):
        nonlocal connections
        connections += 1
        await read_frame(reader)  # hello
        writer.write(control({"op": "status", "pid": 1, "models": {"m": {"state": "ready"}}}))
        if connections == 1:
            writer.write(control({"error": {"type": "EngineError", "message": "no id"}}))
        await writer.drain()
        await reader.read()  # until the link closes this connection

    async with link_to(engine, tmp_path) as (link, _):
        deadline = time.monotonic() + 5
        while not (connections == 2 and link.up):
            assert time.monotonic() < deadline, "the link never came back"
            await asyncio.sleep(0.01)
        assert link.restarts == 1


def test_decoded_crops_pixels_and_preprocessed_inputs_travel_as_raw_tensors(arena):
    crop = torch.arange(3 * 4 * 5, dtype=torch.uint8).reshape(3, 4, 5)
    pixels = Pixels(torch.arange(6 * 5 * 3, dtype=torch.uint8).reshape(6, 5, 3).permute(2, 0, 1))
    ready = Preprocessed(torch.randn(3, 4, 5))
    for payload in (crop, pixels, ready):
        data, form = describe(payload)
        region = arena.allocate(len(data))
        arena.shm.buf[region : region + len(data)] = data
        rebuilt = read_payload(form, region, len(data), arena.shm)
        if payload is crop:
            assert type(rebuilt) is torch.Tensor and torch.equal(rebuilt, crop)
        else:
            assert type(rebuilt) is type(payload) and torch.equal(rebuilt.tensor, payload.tensor)
        arena.free(region)


@pytest.mark.parametrize("probe", [Probe("JPEG", 640, 480, True), Probe("PNG", 7, 70_000, False)])
def test_an_encoded_image_keeps_its_probe_through_the_wire(probe):
    data, form = describe(Encoded(b"bytes", probe))
    rebuilt = rebuild(form, bytearray(data))
    assert rebuilt.probe == probe and rebuilt.data == bytearray(b"bytes")


# ---- a real server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("engine-store"))
    add_tiny_entry(store, "tiny")
    return store


def readyz(base: str) -> httpx.Response:
    return httpx.get(f"{base}/readyz", timeout=5)


def test_every_http_worker_feeds_one_engine(tiny_store):
    data = image_bytes("JPEG", (64, 48))
    env = serve_env(tiny_store, max_delay_ms=2, engine="process", workers=2)
    with running_server(env, workers=2, timeout_s=120) as base:
        pids = {readyz(base).json()["engines"][0]["pid"] for _ in range(20)}
        for _ in range(8):
            r = httpx.post(f"{base}/classify", content=data, headers=JPEG, timeout=30)
            assert r.status_code == 200
    assert len(pids) == 1 and None not in pids


def test_engines_per_device_starts_that_many_and_one_serves_while_the_other_restarts(
    tiny_store,
):
    data = image_bytes("JPEG", (64, 48))
    # at info: a failure shows the engines' restarts and the links' view in the log's tail
    env = serve_env(
        tiny_store, max_delay_ms=2, engine="process", engines_per_device=2, log_level="info"
    )
    with running_server(env, timeout_s=120) as base:

        def classify() -> tuple[int, str]:
            answer = httpx.post(f"{base}/classify", content=data, headers=JPEG, timeout=30)
            return answer.status_code, "" if answer.is_success else answer.text

        deadline = time.monotonic() + 60  # ready once one engine is; the other may lag
        engines = readyz(base).json()["engines"]
        while not all(e["up"] for e in engines):
            assert time.monotonic() < deadline, engines
            time.sleep(0.1)
            engines = readyz(base).json()["engines"]
        assert len(engines) == 2 and len({e["pid"] for e in engines}) == 2
        os.kill(engines[0]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while readyz(base).json()["engines"][0]["up"]:
            assert time.monotonic() < deadline, "the killed engine was never reported down"
            time.sleep(0.05)
        answers = [classify() for _ in range(8)]  # the live engine takes them all
        assert answers == [(200, "")] * 8, readyz(base).text


def test_a_dead_engine_means_503s_then_a_restart(tiny_store):
    data = image_bytes("JPEG", (64, 48))
    with running_server(serve_env(tiny_store, max_delay_ms=2, engine="process")) as base:
        (engine,) = readyz(base).json()["engines"]
        os.kill(engine["pid"], signal.SIGKILL)
        seen_down = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            started = time.monotonic()
            r = httpx.post(f"{base}/classify", content=data, headers=JPEG, timeout=30)
            assert time.monotonic() - started < 5  # an answer, never a hang
            if r.status_code == 503:
                seen_down = True
                assert r.headers["retry-after"]
                ready = readyz(base)
                if ready.status_code == 503:
                    assert "engine" in ready.json()["detail"] or "loading" in ready.json()["detail"]
            elif r.status_code == 200 and seen_down:
                break
            else:
                assert r.status_code == 200
            time.sleep(0.05)
        assert seen_down, "the killed engine was never reported"
        (restarted,) = readyz(base).json()["engines"]
        assert restarted["up"] and restarted["pid"] != engine["pid"]
        assert restarted["restarts"] >= 1


def test_a_request_over_the_pixel_budget_is_refused_with_the_budget(tiny_store):
    small = image_bytes("JPEG", (64, 48))  # 3,072 pixels each
    env = serve_env(tiny_store, max_delay_ms=2, max_request_pixels=5000, engine="process")
    with running_server(env) as base:
        one = httpx.post(f"{base}/classify", files=[("file", ("a.jpg", small))], timeout=30)
        two = httpx.post(
            f"{base}/classify",
            files=[("file", ("a.jpg", small)), ("file", ("b.jpg", small))],
            timeout=30,
        )
        compared = httpx.post(
            f"{base}/compare?models=tiny,tiny",
            files=[("file", ("a.jpg", small)), ("file", ("b.jpg", small))],
            timeout=30,
        )
    assert one.status_code == 200
    for refused in (two, compared):
        assert refused.status_code == 413
        assert "5,000" in refused.json()["error"]["message"]
        assert "VITSERVE_MAX_REQUEST_PIXELS" in refused.json()["error"]["message"]
