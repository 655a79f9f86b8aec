"""The load client of ``vitserve bench service``: multipart requests from asyncio, closed or
open loop, from one or several processes, recording what each answer says of its timings.

Each image's multipart part is encoded once; a request's body is those parts joined. The
client must cost far less than the server it measures: building a ``FormData`` per request
cost it more CPU than the HTTP workers spent parsing it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import secrets
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from app.bench.images import content_type
from app.heap import frozen_heap

Images = list[tuple[str, bytes]]


@dataclass
class Samples:
    """What one level's requests saw, merged over client processes."""

    latencies_ms: list[float] = field(default_factory=list)
    # per image: decode, queue, inference (ms), batch size, request latency (ms)
    splits: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    decoders: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    images: int = 0


BOUNDARY = "vitserve-bench-" + secrets.token_hex(16)


@dataclass(frozen=True)
class Load:
    """What each request carries: ``per_request`` images of ``images``, as multipart."""

    images: Images
    per_request: int = 1


class Bodies:
    """Request ``i``'s multipart body: images ``i`` .. ``i + per_request - 1`` (cyclic),
    each image's part encoded once."""

    content_type = f"multipart/form-data; boundary={BOUNDARY}"

    def __init__(self, load: Load) -> None:
        self.per_request = load.per_request
        self._parts = [
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{name}"\r\nContent-Type: {content_type(name)}\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
            for name, data in load.images
        ]
        self._end = f"--{BOUNDARY}--\r\n".encode()

    def __call__(self, i: int) -> bytes:
        n = len(self._parts)
        return b"".join([*(self._parts[(i + k) % n] for k in range(self.per_request)), self._end])


async def _request(
    http: aiohttp.ClientSession, params: dict[str, str], body: bytes, out: Samples
) -> None:
    headers = {"Content-Type": Bodies.content_type}
    t0 = time.perf_counter()
    try:
        async with http.post("/classify", params=params, data=body, headers=headers) as r:
            status, answer = r.status, await r.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.errors[type(exc).__name__] += 1
        return
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    if status != 200:
        out.errors[str(status)] += 1
        return
    out.latencies_ms.append(elapsed_ms)
    for result in json.loads(answer)["results"]:
        out.images += 1
        t = result.get("timings")  # a LitServe baseline reports none
        if t:
            out.splits.append(
                (t["decode_ms"], t["queue_ms"], t["inference_ms"], t["batch_size"], elapsed_ms)
            )
            out.decoders[str(t.get("decoder"))] += 1


def _params(model: str | None) -> dict[str, str]:
    return {"top_k": "1"} | ({"model": model} if model else {})


async def _drive(
    base: str,
    model: str | None,
    load: Load,
    concurrency: int,
    seconds: float,
    first: int = 0,
    rate: float | None = None,
) -> tuple[Samples, float]:
    """Closed loop: keep ``concurrency`` requests in flight for ``seconds``, one connection
    each. Open loop (``rate`` requests/s): Poisson arrivals whatever the answers do, as
    independent users would send them; ``concurrency`` then caps the connections.

    aiohttp, not httpx: measured against this server's /healthz on two cores, httpx's pool
    fell from 840 to 86 requests/s going from 8 to 128 connections while aiohttp held
    4,000-4,700 -- the client must not be what a benchmark measures."""
    samples = Samples()
    body = Bodies(load)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    # frozen: a client paused by a full collection would add its pause to the latencies
    with frozen_heap():
        async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as http:
            started = time.perf_counter()
            until = started + seconds
            if rate is None:

                async def worker(k: int) -> None:
                    i = k * load.per_request
                    while time.perf_counter() < until:
                        await _request(http, _params(model), body(i), samples)
                        i += load.per_request

                await asyncio.gather(*(worker(first + k) for k in range(concurrency)))
            else:
                arrivals, tasks = random.Random(first), []
                due, i = started, first * load.per_request
                while due < until:
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    tasks.append(
                        asyncio.create_task(_request(http, _params(model), body(i), samples))
                    )
                    i += load.per_request
                    due += arrivals.expovariate(rate)
                await asyncio.gather(*tasks)
            return samples, time.perf_counter() - started


def _run(job: Any) -> Any:
    """``job`` on uvloop where installed (the client's own overhead stays low)."""
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    return run(job)


def _drive_in_process(*args: Any) -> tuple[Samples, float]:
    return _run(_drive(*args))


class Client:
    """The load, from ``processes`` client processes with one event loop each: one Python
    process cannot build and parse as many multipart requests as a GPU server answers."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self._pool = (
            ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
            if processes > 1
            else None
        )

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown()

    def drive(
        self,
        base: str,
        model: str | None,
        load: Load,
        concurrency: int,
        seconds: float,
        rate: float | None = None,
    ) -> tuple[Samples, float]:
        """Closed loop at ``concurrency``, or open loop at ``rate`` requests/s in all."""
        url = str.__str__(base)  # a plain str: a ServerURL carries its (unpicklable) process
        if self._pool is None or concurrency == 1:
            return _run(_drive(url, model, load, concurrency, seconds, 0, rate))
        parts = min(self.processes, concurrency)
        shares = [concurrency // parts + (i < concurrency % parts) for i in range(parts)]
        firsts = [sum(shares[:i]) for i in range(parts)]
        futures = [
            self._pool.submit(
                _drive_in_process,
                *(url, model, load, share, seconds, first),
                None if rate is None else rate * share / concurrency,
            )
            for share, first in zip(shares, firsts, strict=True)
        ]
        done = [f.result() for f in futures]
        total = Samples()
        for samples, _ in done:
            total.latencies_ms += samples.latencies_ms
            total.splits += samples.splits
            total.decoders.update(samples.decoders)
            total.errors.update(samples.errors)
            total.images += samples.images
        return total, max(elapsed for _, elapsed in done)
