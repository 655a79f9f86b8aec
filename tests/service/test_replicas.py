"""One model, two replicas behind one batcher: the dispatch a multi-GPU host uses, on CPU."""

from __future__ import annotations

import asyncio
import json

import httpx

from app.bench.server import running_server
from app.store import ModelStore
from tests.helpers import add_tiny_entry, image_bytes, serve_env


def test_two_cpu_replicas_serve_identical_answers(tmp_path):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    env = serve_env(store, replica_devices=json.dumps(["cpu", "cpu"]), max_batch_size=2)
    data = image_bytes("JPEG", (64, 48), seed=3)

    async def classify_many(base: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            responses = await asyncio.gather(
                *(
                    http.post("/classify", content=data, headers={"content-type": "image/jpeg"})
                    for _ in range(16)
                )
            )
        assert all(r.status_code == 200 for r in responses)
        return [r.json()["results"][0]["predictions"] for r in responses]

    with running_server(env) as base:
        (info,) = httpx.get(f"{base}/models").json()["models"]
        predictions = asyncio.run(classify_many(base))
    assert info["device"] == "cpu,cpu"
    indices = {tuple(p["index"] for p in preds) for preds in predictions}
    assert len(indices) == 1  # both replicas hold the same weights
    scores = [preds[0]["score"] for preds in predictions]
    assert max(scores) - min(scores) < 1e-5
