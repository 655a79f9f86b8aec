"""Compare and shadow internals, in-process on a real pool of tiny models: how often images
are decoded, and how shadow copies stay bounded and off the response path."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.config import Settings
from app.experiments.compare import compare
from app.experiments.shadow import ShadowTraffic
from app.serving.metrics import Metrics
from app.serving.pipeline import ClassifyPipeline, ImageInput
from app.serving.pool import ModelPool, ModelState, ServedModel
from app.store import ModelStore
from tests.helpers import TINY_PREPROCESSING, add_tiny_entry, image_bytes
from tests.promtext import parse, value


class CountingPreprocessor:
    """Counts the decodes made ahead of the queues (compare mode's)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def decode_crop(self, data: bytes):
        self.calls += 1
        return self.inner.decode_crop(data)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.fixture
async def pool(tmp_path):
    store = ModelStore(tmp_path)
    for seed, name in enumerate(("a", "b", "c")):
        add_tiny_entry(store, name, seed=seed)
    other = TINY_PREPROCESSING.model_copy(update={"interpolation": "bilinear"})
    add_tiny_entry(store, "other", seed=3, preprocessing=other)
    settings = Settings(
        store_dir=store.root,
        default_model="a",
        auto_pull=False,
        device="cpu",
        max_batch_size=4,
        shadow={"a": "b"},
        shadow_max_pending=1,
    )
    pool = ModelPool(settings, store, Metrics())
    await pool.start()
    await pool.wait_loaded()
    for model in pool.models.values():
        model.preprocessor = CountingPreprocessor(model.preprocessor)
    yield pool
    await pool.stop()


def images(n: int) -> list[ImageInput]:
    return [ImageInput(f"{i}.png", image_bytes("PNG", (40, 40), seed=i)) for i in range(n)]


def decodes(pool: ModelPool) -> dict[str, int]:
    return {name: m.preprocessor.calls for name, m in pool.models.items()}


async def test_compare_decodes_each_image_once_per_distinct_preprocessing(pool):
    pipeline = ClassifyPipeline(pool)
    result = await compare(pipeline, ["a", "b", "c", "other"], images(3), 5, time.monotonic() + 30)
    assert result.decodes == 2
    # a, b, c share one preprocessing: decoded with a's; "other" decodes its own
    assert decodes(pool) == {"a": 3, "b": 0, "c": 0, "other": 3}
    assert [len(run.results) for run in result.variants] == [3, 3, 3, 3]
    assert all(run.latency_s > 0 for run in result.variants)


def blocked(model: ServedModel) -> threading.Event:
    """Hold the model's next batch until the returned event is set."""
    gate = threading.Event()
    (forward,) = model.batcher._replicas
    model.batcher._replicas[0] = lambda x: (gate.wait(10), forward(x))[1]
    return gate


async def test_shadow_copies_are_bounded_and_never_awaited_by_the_caller(pool):
    pipeline = ClassifyPipeline(pool)
    metrics = pool.metrics
    shadow = ShadowTraffic(pool.settings, pipeline, metrics)
    primary = pool.models["a"]
    served = await pipeline.classify("a", images(1), 5, time.monotonic() + 30)
    gate = blocked(pool.models["b"])

    started = time.monotonic()
    shadow.mirror(primary, images(1), served)  # the shadow's batch is blocked...
    shadow.mirror(primary, images(1), served)  # ...so this one is over shadow_max_pending
    assert time.monotonic() - started < 0.05  # neither call waited for the shadow model
    assert shadow.pending == 1

    gate.set()
    while shadow.pending:
        await asyncio.sleep(0.01)
    samples = parse(metrics.scrape()[0].decode())
    pair = {"reference": "a", "candidate": "b"}
    assert value(samples, "vitserve_shadow_dropped_total", **pair, reason="overloaded") == 1
    agreed = sum(
        value(samples, "vitserve_agreement_total", mode="shadow", **pair, outcome=o)
        for o in ("agree", "disagree")
    )
    assert agreed == 1


async def test_a_shadow_that_is_not_serving_drops_the_copy(pool):
    pipeline = ClassifyPipeline(pool)
    shadow = ShadowTraffic(pool.settings, pipeline, pool.metrics)
    served = await pipeline.classify("a", images(2), 5, time.monotonic() + 30)
    pool.models["b"].state = ModelState.FAILED
    shadow.mirror(pool.models["a"], images(2), served)
    samples = parse(pool.metrics.scrape()[0].decode())
    labels = {"reference": "a", "candidate": "b", "reason": "unavailable"}
    assert value(samples, "vitserve_shadow_dropped_total", **labels) == 2
    assert shadow.pending == 0


async def test_closing_cancels_copies_still_running(pool):
    pipeline = ClassifyPipeline(pool)
    shadow = ShadowTraffic(pool.settings, pipeline, pool.metrics)
    served = await pipeline.classify("a", images(1), 5, time.monotonic() + 30)
    gate = blocked(pool.models["b"])
    shadow.mirror(pool.models["a"], images(1), served)
    await shadow.close()
    assert shadow.pending == 0
    gate.set()
