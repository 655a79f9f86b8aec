"""Overload: past capacity the server sheds load fast and honestly, and recovers at once.

A real server with DeiT-Tiny's architecture (random weights: real compute per batch), a
small batch, a 16-image queue and a 2 s deadline, driven at about three times what it can
hold in flight. Each request must get an answer: a 200, a 429 with Retry-After (queue
full), or a 503/504 (deadline) - never a 500, a reset connection or a hang. Accepted work
is not starved: the time the server spends on it (from the handler's start, which is where
the deadline starts) stays within the deadline plus one batch.

Client-side latency also includes time the request waits in the kernel and for the event
loop on this 2-core machine (client and server share it), so it is only bounded loosely:
an answer, not a hang.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

from app.bench.server import running_server
from app.store import ModelStore
from tests.helpers import add_deit_entry, image_bytes, serve_env

BATCH = 4
QUEUE = 16
DEADLINE_S = 2.0
# The deadline is checked when a batch starts: an accepted request's server time is at
# most the deadline plus one batch (~0.5 s here) and its encoding.
LATENCY_SLACK_S = 1.5
CLIENT_BOUND_S = 20.0  # every answer arrives well before the client's 30 s timeout
CLIENTS = 3 * (QUEUE + BATCH)  # ~3x what the server holds in flight
REQUESTS_PER_CLIENT = 3
IMAGE = image_bytes("JPEG", (64, 48))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("overload-store"))
    add_deit_entry(store)
    env = serve_env(
        store,
        default="deit",
        max_batch_size=BATCH,
        max_delay_ms="5",
        queue_size=QUEUE,
        request_timeout_s=DEADLINE_S,
        cpu_threads="1",  # leave a core to the event loop and the test's client
    )
    with running_server(env, timeout_s=120) as base:
        yield base


async def drive(base: str) -> list[tuple[int | str, float, httpx.Response | None]]:
    """CLIENTS concurrent clients, each sending REQUESTS_PER_CLIENT requests back to back."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    results = []
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:

        async def one_client():
            for _ in range(REQUESTS_PER_CLIENT):
                started = time.monotonic()
                try:
                    r = await client.post(
                        "/classify", content=IMAGE, headers={"content-type": "image/jpeg"}
                    )
                    results.append((r.status_code, time.monotonic() - started, r))
                except httpx.HTTPError as exc:
                    results.append((type(exc).__name__, time.monotonic() - started, None))

        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return results


def test_overload_sheds_with_429_or_deadline_and_recovers(server):
    results = asyncio.run(drive(server))
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT, "a request got no answer"
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 429, 503, 504}, sorted(set(map(str, statuses)))
    assert 200 in statuses, "nothing was served under load"
    assert set(statuses) & {429, 503, 504}, "the load did not exceed capacity"
    for status, _, response in results:
        if status == 429:
            assert int(response.headers["retry-after"]) >= 1
        if status != 200:
            assert response.json()["error"]["code"] in ("queue_full", "deadline_exceeded")
    server_s = [r.json()["timings"]["total_ms"] / 1000 for s, _, r in results if s == 200]
    assert max(server_s) <= DEADLINE_S + LATENCY_SLACK_S, f"accepted work took {max(server_s)}"
    slowest = max(latency for _, latency, _ in results)
    assert slowest <= CLIENT_BOUND_S, f"an answer took {slowest:.1f} s"
    # recovery: the queue drained, the next request is served at once
    started = time.monotonic()
    response = httpx.post(
        f"{server}/classify", content=IMAGE, headers={"content-type": "image/jpeg"}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 2.0
    assert httpx.get(f"{server}/readyz").status_code == 200


def slow_upload(base: str, pieces: int, pause_s: float, answers: list) -> None:
    """A client that trickles its request in (slowloris-style): the head, then the image
    body, each in ``pieces`` pieces with a pause between them."""
    host, port = base.removeprefix("http://").split(":")
    head = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(IMAGE)
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for data in (head, IMAGE):
            step = -(-len(data) // pieces)
            for i in range(0, len(data), step):
                sock.sendall(data[i : i + step])
                time.sleep(pause_s)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    answers.append(answer.split(b" ", 2)[1])


def test_slow_uploads_do_not_block_other_clients(server):
    """Reading a request is async: while a few clients trickle theirs in, everyone else's
    requests are decoded, batched and answered normally, and the slow ones are served too.

    The deadline runs from the end of the head (when the handler starts), upload included,
    so each slow body takes ~1 s, inside the 2 s deadline; its head takes another ~1.5 s,
    which does not count."""
    answers: list[bytes] = []
    slow = [
        threading.Thread(target=slow_upload, args=(server, 25, 0.05, answers)) for _ in range(4)
    ]
    for t in slow:
        t.start()
    time.sleep(0.2)  # the slow uploads are under way
    fast_latencies = []
    with httpx.Client(timeout=10) as client:
        for _ in range(5):
            started = time.monotonic()
            r = client.post(
                f"{server}/classify", content=IMAGE, headers={"content-type": "image/jpeg"}
            )
            assert r.status_code == 200, r.text
            fast_latencies.append(time.monotonic() - started)
    still_uploading = sum(t.is_alive() for t in slow)
    for t in slow:
        t.join(30)
    assert still_uploading == len(slow), "the slow uploads ended before the fast requests"
    assert max(fast_latencies) < 1.0, fast_latencies
    assert answers == [b"200"] * len(slow)
