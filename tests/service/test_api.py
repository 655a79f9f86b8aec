"""The HTTP API, through a real uvicorn process on loopback."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.bench.server import running_server
from app.serving.labels import class_names
from app.store import ModelStore
from tests.helpers import add_deit_entry, add_tiny_entry, image_bytes, serve_env
from tests.unit.test_preprocess import png_header_only

UPLOAD_LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("store"))
    add_tiny_entry(store, "tiny", seed=0)
    add_tiny_entry(store, "tiny-b", seed=1)
    add_tiny_entry(store, "broken", seed=2)
    weights = store.weights_path("broken")
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    add_tiny_entry(store, "absent", seed=3)
    # DeiT-Tiny's real architecture (random weights, tests only): realistic compute per batch
    add_deit_entry(store)
    store.weights_path("absent").unlink()
    env = serve_env(
        store,
        max_batch_size="32",
        max_delay_ms="25",
        max_upload_bytes=UPLOAD_LIMIT,
    )
    with running_server(env) as base:
        yield base


def post_image(base: str, data: bytes, content_type="image/jpeg", **params) -> httpx.Response:
    return httpx.post(
        f"{base}/classify",
        content=data,
        params=params,
        headers={"content-type": content_type},
        timeout=30,
    )


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code
    return error


def test_health_and_readiness_report_every_model(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == {
        "tiny": "ready",
        "tiny-b": "ready",
        "broken": "failed",
        "absent": "absent",
        "deit": "ready",
    }


def test_models_say_why_a_model_is_not_serving(server):
    models = {m["name"]: m for m in httpx.get(f"{server}/models").json()["models"]}
    assert models["tiny"]["default"] and models["tiny"]["state"] == "ready"
    assert models["tiny"]["dtype"] == "float32" and models["tiny"]["device"] == "cpu"
    assert "checksum mismatch" in models["broken"]["reason"]
    assert "vitserve store import" in models["absent"]["reason"]


def test_classify_a_raw_image_body(server):
    response = post_image(server, image_bytes("JPEG", (80, 60)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny" and body["variant"] == "dense"
    (result,) = body["results"]
    predictions = result["predictions"]
    assert len(predictions) == 5
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    names = class_names("imagenet-1k")
    assert all(p["label"] == names[p["index"]] for p in predictions)
    assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"] > 0


def test_classify_several_files_in_one_multipart_request(server):
    files = [
        ("file", (f"img{i}.png", image_bytes("PNG", (40, 40), seed=i), "image/png"))
        for i in range(3)
    ]
    response = httpx.post(f"{server}/classify", files=files, params={"top_k": 2})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["img0.png", "img1.png", "img2.png"]
    assert all(len(r["predictions"]) == 2 for r in results)


def test_model_is_chosen_by_query(server):
    data = image_bytes("JPEG", (64, 64), seed=5)
    a = post_image(server, data, model="tiny").json()
    b = post_image(server, data, model="tiny-b").json()
    assert b["model"] == "tiny-b"
    assert a["results"][0]["predictions"] != b["results"][0]["predictions"]


@pytest.mark.parametrize("name", ["nope", "../tiny", "tiny/../../etc", "ü🙂"])
def test_unknown_model_is_404_listing_the_available_ones(server, name):
    error = assert_error(post_image(server, image_bytes(), model=name), 404, "unknown_model")
    assert "tiny-b" in error["message"]


@pytest.mark.parametrize("name", ["broken", "absent"])
def test_a_model_that_is_not_serving_is_503_with_its_reason(server, name):
    response = post_image(server, image_bytes(), model=name)
    error = assert_error(response, 503, "model_unavailable")
    assert name in error["message"] and response.headers["retry-after"]


@pytest.mark.parametrize("top_k", ["0", "-3", "21", "abc", "99999999999999999999"])
def test_bad_top_k_is_422(server, top_k):
    assert_error(post_image(server, image_bytes(), top_k=top_k), 422, "invalid_request")


@pytest.mark.parametrize(
    "data,content_type,status,code",
    [
        (b"", "image/jpeg", 400, "empty_image"),
        (b"just text", "text/plain", 415, "unsupported_media_type"),
        (b'{"a": 1}', "application/json", 415, "unsupported_media_type"),
        (b"not really a jpeg", "image/jpeg", 415, "unsupported_media_type"),
        (image_bytes("JPEG", (100, 100))[:500], "image/jpeg", 400, "corrupt_image"),
        (png_header_only(30000, 30000), "image/png", 413, "image_too_large"),
        (b"\xff" * (UPLOAD_LIMIT + 1), "image/jpeg", 413, "payload_too_large"),
    ],
    ids=["empty", "text", "json", "fake-jpeg", "truncated", "bomb", "oversized"],
)
def test_bad_input_gets_a_clear_json_error(server, data, content_type, status, code):
    assert_error(post_image(server, data, content_type), status, code)


def test_oversized_streamed_upload_without_length_is_413(server):
    def chunks():
        for _ in range(40):
            yield b"\0" * 65536

    response = httpx.post(
        f"{server}/classify", content=chunks(), headers={"content-type": "image/jpeg"}
    )
    assert_error(response, 413, "payload_too_large")


def test_multipart_without_a_file_field_is_400(server):
    response = httpx.post(
        f"{server}/classify",
        data={"other": "x"},
        files=[("image", ("a.png", image_bytes("PNG"), "image/png"))],
    )
    assert_error(response, 400, "missing_file")


def test_openapi_documents_the_endpoints(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    assert {"/classify", "/models", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    assert httpx.get(f"{server}/docs").status_code == 200


def test_metrics_count_requests_by_model_route_and_status(server):
    post_image(server, image_bytes())
    text = httpx.get(f"{server}/metrics").text
    assert 'vitserve_requests_total{model="tiny",route="/classify",status="200"}' in text
    assert 'vitserve_batch_size_count{model="tiny"}' in text
    assert 'vitserve_queue_wait_seconds_bucket{le="0.005",model="tiny"}' in text
    assert 'vitserve_rejected_total{model="tiny",reason="bad_input"}' in text


def metric_value(text: str, name: str, model: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0  # not yet observed


def test_sixty_four_concurrent_clients_are_batched(server):
    """Real batching: with 64 clients in flight on DeiT-Tiny the mean batch size exceeds 8."""
    before = httpx.get(f"{server}/metrics").text
    data = image_bytes("JPEG", (64, 64))

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(4):
            r = await http.post(
                "/classify",
                content=data,
                params={"model": "deit"},
                headers={"content-type": "image/jpeg"},
            )
            assert r.status_code == 200

    async def main() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=60) as http:
            await asyncio.gather(*(client(http) for _ in range(64)))

    asyncio.run(main())
    after = httpx.get(f"{server}/metrics").text
    images, batches = (
        metric_value(after, name, "deit") - metric_value(before, name, "deit")
        for name in ("vitserve_batch_size_sum", "vitserve_batch_size_count")
    )
    assert images == 256
    assert images / batches > 8, f"mean batch size {images / batches:.1f}"
