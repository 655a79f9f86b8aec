"""The dynamic batcher: real batching, bounded queue, deadlines, and failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from app.serving.batcher import DeadlineExceeded, DynamicBatcher, QueueFull
from app.serving.decode import DecodedBatch, stack_tensors
from app.serving.metrics import Metrics
from app.serving.runner import ModelRunner


class RecordingModel:
    """Stands in for a runner: records batch sizes, returns each image's mean as its 'probs'."""

    def __init__(self, delay_s: float = 0.0, fail_when=lambda batch: False) -> None:
        self.batches: list[int] = []
        self.delay_s, self.fail_when = delay_s, fail_when
        self.computed: list[float] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        if self.fail_when(images):
            raise RuntimeError("forward failed")
        self.batches.append(len(images))
        self.computed.extend(images.flatten(1).mean(1).tolist())
        return images.flatten(1).mean(1, keepdim=True)


def make(model, **kw) -> DynamicBatcher:
    opts = dict(max_batch_size=16, max_delay_s=0.02, queue_size=256, metrics=Metrics())
    opts.update(kw)
    return DynamicBatcher("m", model, **opts)


def image(value: float) -> torch.Tensor:
    return torch.full((3, 4, 4), float(value))


def far() -> float:
    return time.monotonic() + 60


async def test_concurrent_requests_are_batched_and_each_gets_its_own_row():
    model = RecordingModel(delay_s=0.01)
    batcher = make(model)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(image(i), far()) for i in range(64)))
    await batcher.stop()
    assert [r.probs.item() for r in results] == [float(i) for i in range(64)]
    assert sum(model.batches) == 64
    assert max(model.batches) == 16 and len(model.batches) <= 8
    assert all(r.batch_size >= 1 for r in results)


async def test_a_lone_request_waits_at_most_the_delay():
    batcher = make(RecordingModel(), max_delay_s=0.05)
    batcher.start()
    started = time.monotonic()
    result = await batcher.submit(image(1), far())
    await batcher.stop()
    assert result.batch_size == 1
    assert time.monotonic() - started < 1.0


async def test_full_queue_rejects_with_a_retry_hint():
    gate = threading.Event()
    model = RecordingModel()
    batcher = make(lambda x: (gate.wait(5), model(x))[1], max_batch_size=1, queue_size=2)
    batcher.start()
    taken = [asyncio.create_task(batcher.submit(image(i), far())) for i in (0, 1)]
    # image 0 computes (held at the gate), image 1 is decoded and waits its turn: both
    # slots are busy and the queue is empty again
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(batcher.submit(image(i), far())) for i in (2, 3)]
    await asyncio.sleep(0.01)
    assert batcher.depth == 2
    with pytest.raises(QueueFull) as info:
        await batcher.submit(image(4), far())
    assert info.value.retry_after_s >= 1
    gate.set()
    assert [(await t).probs.item() for t in (*taken, *queued)] == [0.0, 1.0, 2.0, 3.0]
    await batcher.stop()


async def test_expired_requests_are_not_computed():
    gate = threading.Event()
    model = RecordingModel()
    batcher = make(lambda x: (gate.wait(5), model(x))[1], max_batch_size=1)
    batcher.start()
    blocker = asyncio.create_task(batcher.submit(image(0), far()))
    await asyncio.sleep(0.05)
    late = asyncio.create_task(batcher.submit(image(7), time.monotonic() + 0.05))
    await asyncio.sleep(0.2)
    gate.set()
    await blocker
    with pytest.raises(DeadlineExceeded):
        await late
    await batcher.stop()
    assert 7.0 not in model.computed


async def test_it_counts_the_images_batches_and_forward_time_it_computed():
    """An engine's status carries these counts: the expired image is not among them."""
    model = RecordingModel(delay_s=0.01)
    batcher = make(model, max_batch_size=8)
    batcher.start()
    await asyncio.gather(*(batcher.submit(image(i), far()) for i in range(20)))
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(image(99), time.monotonic() - 1)
    await batcher.stop()
    computed = batcher.computed
    assert computed.images == 20 and computed.batches == len(model.batches)
    assert 0.01 * computed.batches <= computed.forward_s < 5


async def test_a_failing_batch_fails_only_its_own_requests():
    model = RecordingModel(fail_when=lambda x: bool((x == 13).any()))
    batcher = make(model, max_batch_size=4, max_delay_s=0.05)
    batcher.start()
    bad = await asyncio.gather(
        *(batcher.submit(image(v), far()) for v in (13, 1)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in bad)
    good = await asyncio.gather(*(batcher.submit(image(v), far()) for v in (2, 3)))
    assert [r.probs.item() for r in good] == [2.0, 3.0]
    await batcher.stop()


async def test_stop_finishes_everything_already_queued():
    batcher = make(RecordingModel(delay_s=0.01), max_batch_size=2)
    batcher.start()
    tasks = [asyncio.create_task(batcher.submit(image(i), far())) for i in range(10)]
    await asyncio.sleep(0)
    await batcher.stop()
    assert [t.result().probs.item() for t in tasks] == [float(i) for i in range(10)]


def test_out_of_memory_splits_the_batch_and_retries():
    """Inject CUDA OOM for batches over 2: the runner halves until the batch fits."""
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    runner = ModelRunner(
        module, device=torch.device("cpu"), dtype=torch.float32, input_size=(3, 4, 4)
    )
    real, sizes = runner.forward, []

    def forward(x):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(x)

    runner.forward = forward
    x = torch.randn(7, 3, 4, 4)
    probs = runner.predict(x)
    expected = module(x).softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert max(s for s in sizes if s <= 2) == 2 and sizes[0] == 7


def test_out_of_memory_at_batch_one_is_raised():
    runner = ModelRunner(
        torch.nn.Flatten(), device=torch.device("cpu"), dtype=torch.float32, input_size=(3, 4, 4)
    )

    def forward(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    runner.forward = forward
    with pytest.raises(torch.cuda.OutOfMemoryError):
        runner.predict(torch.randn(1, 3, 4, 4))


async def test_replicas_run_batches_side_by_side_from_one_queue():
    """Two replicas (one per GPU in production; two CPU callables here): while one
    computes, the next batch goes to the other, so two slow batches take one batch's time."""
    used: list[str] = []

    def replica(tag: str):
        def predict(images: torch.Tensor) -> torch.Tensor:
            used.append(tag)
            time.sleep(0.3)
            return images.flatten(1).mean(1, keepdim=True)

        return predict

    batcher = make([replica("a"), replica("b")], max_batch_size=4, max_delay_s=0.01)
    batcher.start()
    started = time.monotonic()
    results = await asyncio.gather(*(batcher.submit(image(i), far()) for i in range(8)))
    elapsed = time.monotonic() - started
    await batcher.stop()
    assert [r.probs.item() for r in results] == [float(i) for i in range(8)]
    assert sorted(used) == ["a", "b"]
    assert elapsed < 0.55, f"two batches on two replicas took {elapsed:.2f}s"


async def test_a_single_replica_runs_one_batch_at_a_time():
    model = RecordingModel(delay_s=0.1)
    batcher = make(model, max_batch_size=4, max_delay_s=0.01)
    batcher.start()
    started = time.monotonic()
    await asyncio.gather(*(batcher.submit(image(i), far()) for i in range(8)))
    assert time.monotonic() - started >= 0.2
    await batcher.stop()
    assert model.batches == [4, 4]


async def test_each_image_gets_its_classes_ranked_on_the_inference_thread():
    """The batch's top-k is computed once, off the event loop; each image gets its own."""
    probs = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.7, 0.0, 0.1, 0.2]])
    batcher = make(lambda x: probs[x[:, 0, 0, 0].long()], top_k=3, max_delay_s=0.05)
    batcher.start()
    a, b = await asyncio.gather(*(batcher.submit(image(i), far()) for i in (0, 1)))
    await batcher.stop()
    assert a.top_indices[0] == 1 and b.top_indices == [0, 3, 2]
    assert b.top_scores == pytest.approx([0.7, 0.2, 0.1])
    assert torch.equal(a.probs, probs[0])


async def test_a_decoded_batch_computes_while_the_event_loop_is_busy():
    """The decode thread hands the batch to the inference thread itself: a loop busy with
    other work (the engine's, every worker's images) does not hold the forward back."""
    computed_at: list[float] = []

    def model(images: torch.Tensor) -> torch.Tensor:
        computed_at.append(time.monotonic())
        return images.flatten(1).mean(1, keepdim=True)

    def slow_decode(payloads: list[torch.Tensor]) -> DecodedBatch:
        time.sleep(0.05)
        return stack_tensors(payloads)

    batcher = make(model, decode=slow_decode, max_delay_s=0.0)
    batcher.start()
    pending = batcher.enqueue(image(1), far())
    await asyncio.sleep(0.01)  # the batch closes and starts decoding on its thread
    time.sleep(0.3)  # the loop blocked: nothing on it may be needed for the forward to run
    unblocked = time.monotonic()
    result = await pending
    await batcher.stop()
    assert computed_at and computed_at[0] < unblocked
    assert result.inference_s < 0.1  # the forward's own time, not the loop's delay in reading it
