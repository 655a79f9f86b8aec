"""Keep Python's full garbage collections off the request path.

A full (generation 2) collection walks every tracked object with the GIL held. Once torch,
timm and the app are imported and a model is loaded, a process holds ~400k of them, and one
``gc.collect()`` took 256-277 ms on this project's CI machine: its event loop, batcher and
inference thread all stand still meanwhile, and under load such collections recur. Before
the heap was frozen, the H200 service benchmark showed p99 spikes of 290-370 ms in one level
out of three, closed or open loop; with it frozen, eight half-load levels in a row gave p99
59-81 ms. What start-up created lives as long as the process, so it moves to the permanent
generation, which collections skip: only what requests allocate is scanned afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze_heap() -> int:
    """Collect once, then freeze what survives; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Give frozen objects back to the collector (a stopped server's models may be garbage:
    a test process starts and stops many)."""
    gc.unfreeze()


@contextlib.contextmanager
def frozen_heap() -> Iterator[int]:
    """``freeze_heap`` for the duration of a block (a load client's measured level)."""
    try:
        yield freeze_heap()
    finally:
        thaw_heap()
