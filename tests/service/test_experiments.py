"""Compare mode, A/B routing and shadow traffic, through a real server (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import httpx
import pytest
import torch

from app.experiments.agreement import agreement
from app.experiments.routing import AbRouter
from app.serving.metrics import Metrics
from app.serving.preprocess import Preprocessor
from tests.conftest import AB_EXPECTED, AB_WEIGHTS, STICKY_HEADER
from tests.helpers import image_bytes
from tests.promtext import scrape, total, value

JPEG = {"content-type": "image/jpeg"}


def png_parts(seeds) -> list:
    return [
        ("file", (f"img{s}.png", image_bytes("PNG", (40, 40), seed=s), "image/png")) for s in seeds
    ]


def compare(base: str, models: str, files=None, content=None, **params) -> httpx.Response:
    return httpx.post(
        f"{base}/compare",
        params={"models": models, **params},
        files=files,
        content=content,
        headers=None if files else JPEG,
        timeout=30,
    )


def classify_many(base: str, headers: list[dict[str, str]]) -> list[dict]:
    """One /classify (no ?model=) per header set, 32 at a time."""
    data = image_bytes("JPEG", (48, 48))

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:
            gate = asyncio.Semaphore(32)

            async def one(h: dict[str, str]) -> dict:
                async with gate:
                    r = await http.post("/classify", content=data, headers={**JPEG, **h})
                assert r.status_code == 200, r.text
                return r.json()

            return await asyncio.gather(*(one(h) for h in headers))

    return asyncio.run(main())


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    """Interval that a Binomial(n, p) count leaves with probability < 1e-6."""
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


# ---- A/B routing --------------------------------------------------------------------------


def test_ab_split_over_200_requests_matches_the_weights(experiment_server):
    base = experiment_server.base
    before = scrape(base)
    bodies = classify_many(base, [{}] * 200)
    after = scrape(base)
    assert {b["routed_by"] for b in bodies} == {"ab"}
    counts = Counter(b["model"] for b in bodies)
    assert set(counts) == set(AB_EXPECTED), counts  # "absent" is never served
    low, high = binomial_bound(200, AB_EXPECTED["tiny-b"])
    assert low <= counts["tiny-b"] <= high, counts
    for model, count in counts.items():
        delta = value(after, "vitserve_ab_assignments_total", model=model) - value(
            before, "vitserve_ab_assignments_total", model=model
        )
        assert delta == count
    # the absent variant's picks (weight 0.2) are counted as skipped, then served elsewhere
    skipped = value(after, "vitserve_ab_skipped_total", model="absent") - value(
        before, "vitserve_ab_skipped_total", model="absent"
    )
    low, high = binomial_bound(200, AB_WEIGHTS["absent"])
    assert low <= skipped <= high
    assert value(after, "vitserve_ab_assignments_total", model="absent") == 0


def test_sticky_header_keeps_each_client_on_the_variant_its_hash_picks(experiment_server):
    clients = [f"client-{i}" for i in range(40)]
    bodies = classify_many(experiment_server.base, [{STICKY_HEADER: c} for c in clients * 3])
    seen: dict[str, set[str]] = {}
    for client, body in zip(clients * 3, bodies, strict=True):
        seen.setdefault(client, set()).add(body["model"])
    assert all(len(models) == 1 for models in seen.values()), seen
    # the same stable hash, computed here, predicts every assignment
    router = AbRouter(AB_WEIGHTS, STICKY_HEADER, Metrics())
    expected = {c: router.choose(c, lambda name: name != "absent") for c in clients}
    assert {c: models.pop() for c, models in seen.items()} == expected
    assert set(expected.values()) == {"tiny", "tiny-b"}


def test_model_in_the_query_bypasses_ab(experiment_server):
    response = httpx.post(
        f"{experiment_server.base}/classify",
        params={"model": "tiny-c"},
        content=image_bytes(),
        headers={**JPEG, STICKY_HEADER: "client-1"},
    )
    assert response.status_code == 200
    assert (response.json()["model"], response.json()["routed_by"]) == ("tiny-c", "query")


# ---- compare ------------------------------------------------------------------------------


def test_compare_same_model_twice_agrees_fully(experiment_server):
    response = compare(experiment_server.base, "tiny,tiny", files=png_parts(range(3)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [v["model"] for v in body["variants"]] == ["tiny", "tiny"]
    (pair,) = body["agreement"]
    assert (pair["reference"], pair["candidate"]) == ("tiny", "tiny")
    assert pair["summary"]["images"] == 3
    assert pair["summary"]["top1_agreement"] == 1.0 and pair["summary"]["top5_overlap"] == 1.0
    for figures in pair["images"]:
        assert figures["top1_match"] and figures["top5_overlap"] == 1.0
        for measure in ("total_variation", "js_divergence", "symmetric_kl"):
            assert figures[measure] == pytest.approx(0.0, abs=1e-6)
    first, second = (v["results"] for v in body["variants"])
    assert [r["predictions"][0]["index"] for r in first] == [
        r["predictions"][0]["index"] for r in second
    ]


def local_probs(store, name: str, data: list[bytes]) -> torch.Tensor:
    """What the server should compute, computed here from the store entry."""
    loaded = store.load(name)
    preprocess = Preprocessor(loaded.manifest.preprocessing, 10**8)
    with torch.inference_mode():
        return loaded.module(torch.stack([preprocess(d) for d in data])).float().softmax(-1)


def test_compare_two_models_matches_a_local_computation(experiment_server):
    seeds = range(8)
    data = [image_bytes("PNG", (40, 40), seed=s) for s in seeds]
    response = compare(experiment_server.base, "tiny,tiny-b", files=png_parts(seeds), top_k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    p = local_probs(experiment_server.store, "tiny", data)
    q = local_probs(experiment_server.store, "tiny-b", data)
    for variant, probs in zip(body["variants"], (p, q), strict=True):
        for result, row in zip(variant["results"], probs, strict=True):
            assert [x["index"] for x in result["predictions"]] == row.topk(5).indices.tolist()
        assert variant["timings"]["latency_ms"] > 0
    (pair,) = body["agreement"]
    assert [im["filename"] for im in pair["images"]] == [f"img{s}.png" for s in seeds]
    for figures, a, b in zip(pair["images"], p, q, strict=True):
        local = agreement(a, b)
        assert figures["top1_match"] == local.top1_match
        assert figures["top5_overlap"] == local.top5_overlap
        for measure in ("total_variation", "js_divergence", "symmetric_kl"):
            assert figures[measure] == pytest.approx(getattr(local, measure), rel=1e-4, abs=1e-7)
    matches = [im["top1_match"] for im in pair["images"]]
    assert pair["summary"]["top1_agreement"] == pytest.approx(sum(matches) / len(matches))
    assert 0 < pair["summary"]["total_variation"] < 1


def test_compare_decodes_once_per_distinct_preprocessing(experiment_server):
    base = experiment_server.base
    shared = compare(base, "tiny,tiny-b,tiny", files=png_parts(range(2)))
    mixed = compare(base, "tiny,tiny-b,tiny-c", files=png_parts(range(2)))
    assert shared.json()["timings"]["decodes_per_image"] == 1
    assert mixed.json()["timings"]["decodes_per_image"] == 2
    assert [p["candidate"] for p in mixed.json()["agreement"]] == ["tiny-b", "tiny-c"]


@pytest.mark.parametrize(
    "models,status,code",
    [
        ("tiny", 422, "invalid_request"),
        ("tiny,", 422, "invalid_request"),
        ("tiny,tiny,tiny,tiny,tiny", 422, "invalid_request"),
        ("tiny,nope", 404, "unknown_model"),
        ("tiny,absent", 503, "model_unavailable"),
    ],
)
def test_compare_refuses_bad_model_lists(experiment_server, models, status, code):
    response = compare(experiment_server.base, models, content=image_bytes())
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_compare_counts_rejections_against_each_model(experiment_server):
    base = experiment_server.base
    before = scrape(base)
    assert compare(base, "tiny,tiny-b", content=b"not an image").status_code == 415
    assert compare(base, "tiny,absent", content=image_bytes()).status_code == 503
    after = scrape(base)

    def delta(model: str, reason: str) -> float:
        name = "vitserve_rejected_total"
        return value(after, name, model=model, reason=reason) - value(
            before, name, model=model, reason=reason
        )

    assert delta("tiny", "bad_input") == delta("tiny-b", "bad_input") == 1
    assert delta("absent", "unavailable") == 1 and delta("tiny", "unavailable") == 0


# ---- shadow -------------------------------------------------------------------------------


def wait_for(base: str, name: str, target: float, timeout_s: float = 15, **labels) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(base)
        if total(samples, name, **labels) >= target or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def settled(base: str) -> dict:
    """Metrics once earlier tests' shadow copies have finished (two equal scrapes)."""
    previous = scrape(base)
    for _ in range(50):
        time.sleep(0.1)
        current = scrape(base)
        if total(current, "vitserve_agreement_total") == total(
            previous, "vitserve_agreement_total"
        ):
            return current
        previous = current
    raise AssertionError("shadow traffic did not settle")


def test_shadow_copies_agree_exactly_as_compare_says(experiment_server):
    base = experiment_server.base
    seeds = range(100, 112)
    pair = {"mode": "shadow", "reference": "tiny", "candidate": "tiny-b"}
    before = settled(base)
    for s in seeds:  # one image at a time: each copy fits the shadow's queue share
        r = httpx.post(f"{base}/classify", params={"model": "tiny"}, files=png_parts([s]))
        assert r.status_code == 200 and r.json()["model"] == "tiny"
    target = total(before, "vitserve_agreement_total", **pair) + len(seeds)
    after = wait_for(base, "vitserve_agreement_total", target, **pair)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **pair, **labels) - value(before, name, **pair, **labels)

    figures = compare(base, "tiny,tiny-b", files=png_parts(seeds)).json()["agreement"][0]
    matches = sum(im["top1_match"] for im in figures["images"])
    assert 0 < matches < len(seeds), "the near copy should agree on some images, not all"
    assert delta("vitserve_agreement_total", outcome="agree") == matches
    assert delta("vitserve_agreement_total", outcome="disagree") == len(seeds) - matches
    tv_sum = delta("vitserve_agreement_distance_sum", measure="total_variation")
    assert tv_sum == pytest.approx(sum(im["total_variation"] for im in figures["images"]), 1e-4)
    assert delta("vitserve_agreement_distance_count", measure="js_divergence") == len(seeds)


def test_shadow_with_another_preprocessing_decodes_anew(experiment_server):
    base = experiment_server.base
    pair = {"mode": "shadow", "reference": "tiny-c", "candidate": "tiny"}
    before = settled(base)
    r = httpx.post(f"{base}/classify", params={"model": "tiny-c"}, files=png_parts([7]))
    assert r.status_code == 200
    target = total(before, "vitserve_agreement_total", **pair) + 1
    after = wait_for(base, "vitserve_agreement_total", target, **pair)
    tv = value(after, "vitserve_agreement_distance_sum", **pair, measure="total_variation") - value(
        before, "vitserve_agreement_distance_sum", **pair, measure="total_variation"
    )
    expected = compare(base, "tiny-c,tiny", files=png_parts([7])).json()["agreement"][0]
    assert tv == pytest.approx(expected["images"][0]["total_variation"], rel=1e-4)


def test_a_shadow_copy_that_does_not_fit_is_dropped_and_the_response_unaffected(
    experiment_server,
):
    base = experiment_server.base
    labels = {"reference": "tiny", "candidate": "tiny-b", "reason": "queue_full"}
    before = scrape(base)
    r = httpx.post(f"{base}/classify", params={"model": "tiny"}, files=png_parts(range(3)))
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    after = scrape(base)
    dropped = value(after, "vitserve_shadow_dropped_total", **labels) - value(
        before, "vitserve_shadow_dropped_total", **labels
    )
    assert dropped == 3


def test_openapi_documents_compare(experiment_server):
    spec = httpx.get(f"{experiment_server.base}/openapi.json").json()
    operation = spec["paths"]["/compare"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(operation["requestBody"]["content"])
    assert {p["name"] for p in operation["parameters"]} == {"models", "top_k"}
    routed_by = spec["components"]["schemas"]["ClassifyResponse"]["properties"]["routed_by"]
    assert set(routed_by["enum"]) == {"ab", "query", "default"}
