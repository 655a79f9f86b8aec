"""What start-up creates is frozen out of garbage collection while a server runs.

A full collection walks every tracked object with the GIL held (256-277 ms on the CI
machine once torch and a model are loaded), stalling every request of the process. A server
freezes its heap once its models are loaded and thaws it when it stops, so a process that
starts many servers (this test suite) can still collect what a stopped one left.
"""

from __future__ import annotations

import gc

from app.config import Settings
from app.heap import frozen_heap
from app.serving.metrics import Metrics
from app.serving.pool import ModelPool, ModelState
from app.store import ModelStore
from tests.helpers import add_tiny_entry


def test_frozen_heap_freezes_what_exists_and_thaws_on_exit():
    survivors = [[] for _ in range(1000)]  # containers: tracked by the collector
    with frozen_heap() as frozen:
        assert frozen >= len(survivors)
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


async def test_a_pool_freezes_its_heap_once_loaded_and_thaws_it_when_stopped(tmp_path):
    store = ModelStore(tmp_path)
    add_tiny_entry(store, "a")
    settings = Settings(store_dir=store.root, default_model="a", auto_pull=False, device="cpu")
    pool = ModelPool(settings, store, Metrics())
    assert gc.get_freeze_count() == 0
    await pool.start()
    await pool.wait_loaded()
    assert pool.models["a"].state is ModelState.READY
    assert gc.get_freeze_count() > 10_000  # torch, the app and the model at least
    await pool.stop()
    assert gc.get_freeze_count() == 0
