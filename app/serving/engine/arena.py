"""A worker's shared-memory arena: image bytes are written once here, and the engine reads
them in place of a copy through a pipe.

Each HTTP worker owns one segment and hands out regions in ring order; the engine frees a
region by answering its image. Answers can come back out of order (a small batch of
another model overtakes), so a freed region is only reclaimed once every older one is.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

from app.serving.batcher import DeadlineExceeded


class ShmArena:
    """Regions of one shared-memory segment, allocated in ring order (writer side)."""

    def __init__(self, size: int) -> None:
        self.shm = SharedMemory(create=True, size=size)
        self.name, self.size = self.shm.name, size
        self._order: deque[tuple[int, int]] = deque()  # live (offset, end), oldest first
        self._freed: set[int] = set()
        self._head = 0  # where the next region starts
        self._space = asyncio.Event()

    # ---- allocation --------------------------------------------------------------------
    def allocate(self, n: int) -> int | None:
        """The offset of a free region of ``n`` bytes, or None while the ring is full."""
        if not 0 < n <= self.size:
            raise ValueError(f"{n} bytes do not fit an arena of {self.size}")
        if not self._order:
            start = 0
        else:
            tail = self._order[0][0]
            wrapped = self._head <= tail
            if not wrapped and self._head + n <= self.size:
                start = self._head
            elif not wrapped and n <= tail:
                start = 0  # wrap; the end of the segment stays unused until the tail passes
            elif wrapped and self._head + n <= tail:
                start = self._head
            else:
                return None
        self._order.append((start, start + n))
        self._head = start + n
        return start

    def free(self, offset: int) -> None:
        self._freed.add(offset)
        while self._order and self._order[0][0] in self._freed:
            self._freed.discard(self._order.popleft()[0])
        if not self._order:
            self._head = 0
        self._space.set()

    async def put(self, data: bytes | memoryview, deadline: float) -> int:
        """Copy ``data`` into a region (waiting for one up to ``deadline``); its offset."""
        while (offset := self.allocate(len(data))) is None:
            self._space.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("deadline passed waiting for the engine to take images")
            try:
                await asyncio.wait_for(self._space.wait(), remaining)
            except TimeoutError:
                continue
        self.shm.buf[offset : offset + len(data)] = data
        return offset

    @property
    def used(self) -> int:
        return len(self._order)

    def close(self) -> None:
        self.shm.close()
        self.shm.unlink()


def attach(name: str) -> SharedMemory:
    """Map a worker's arena in the engine, without taking ownership: Python < 3.13 registers
    an attached segment with the resource tracker, which would unlink it at engine exit
    under the worker's feet (a restarted engine could no longer attach)."""
    shm = SharedMemory(name=name)
    resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 - see docstring
    return shm
