"""The LitServe baseline on CPU: our model's answers, under concurrency, and a clean stop."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from app.bench.litserve_baseline import Baseline, running_litserve
from app.serving.preprocess import Preprocessor
from app.serving.runner import ModelRunner
from app.store import ModelStore
from tests.helpers import add_tiny_entry, image_bytes

IMAGES = [image_bytes("JPEG", (64, 48), seed=seed) for seed in range(8)]


def our_top1(store: ModelStore, name: str) -> list[tuple[int, float]]:
    """What our service's own decode + runner give for ``IMAGES``, one image at a time."""
    loaded = store.load(name)
    preprocess = Preprocessor(loaded.manifest.preprocessing, max_pixels=10**8)
    runner = ModelRunner(
        loaded.module,
        device=torch.device("cpu"),
        dtype=torch.float32,
        input_size=loaded.manifest.preprocessing.input_size,
    )
    top1 = []
    for data in IMAGES:
        score, index = runner.predict(preprocess(data)[None])[0].max(dim=-1)
        top1.append((int(index), float(score)))
    return top1


def classify(base: str, data: bytes) -> httpx.Response:
    files = {"file": ("image.jpg", data, "image/jpeg")}
    return httpx.post(f"{base}/classify", files=files, timeout=60)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("decode_threads", [0, 2], ids=["decode-per-request", "decode-in-batch"])
def test_litserve_baseline_serves_our_model(tmp_path, decode_threads):
    """Decoded one request at a time (LitServe's default path) or a batch at a time on
    threads in ``batch()``: the same answers as our own decode and runner."""
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    expected = our_top1(store, "tiny")

    baseline = Baseline(
        store.root, "tiny", max_batch_size=8, batch_timeout=0.05, decode_threads=decode_threads
    )
    with running_litserve(baseline, timeout_s=90) as base:
        first = classify(base, IMAGES[0])
        with ThreadPoolExecutor(len(IMAGES)) as pool:
            responses = list(pool.map(lambda data: classify(base, data), IMAGES))
        pgid = base.pid

    assert first.status_code == 200, first.text
    [[prediction]] = [r["predictions"] for r in first.json()["results"]]
    assert prediction["index"] == expected[0][0]
    assert prediction["score"] == pytest.approx(expected[0][1], rel=1e-4)
    assert isinstance(prediction["label"], str) and prediction["label"]

    assert [r.status_code for r in responses] == [200] * len(IMAGES)
    got = [r.json()["results"][0]["predictions"][0] for r in responses]
    assert [p["index"] for p in got] == [index for index, _ in expected]
    assert [p["score"] for p in got] == pytest.approx([s for _, s in expected], rel=1e-4)

    # start_new_session + killpg: no LitServe worker outlives the context.
    deadline = time.monotonic() + 10
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(pgid)


def test_decoding_in_batch_needs_batches():
    """At batch 1 LitServe never calls ``batch()``: the bytes would reach the model."""
    with pytest.raises(ValueError, match="max_batch_size"):
        Baseline(Path("store"), "tiny", max_batch_size=1, decode_threads=2)
