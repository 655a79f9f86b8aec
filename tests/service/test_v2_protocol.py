"""The Open Inference Protocol (v2) over REST and gRPC, driven by Triton's own clients.

A tiny random-weight ViT serves most tests; what the server answers for PIXELS (UINT8)
and PREPROCESSED (FP32) inputs must equal the same images transformed here and run
through the same weights in this process. Errors come back with the v2 status (and gRPC
code) that the same failure gets on /classify, and count in /metrics.
"""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from app.bench.server import running_server
from app.serving.preprocess import Preprocessor
from app.store import ModelStore
from tests.conftest import add_near_copy
from tests.helpers import add_tiny_entry, image_bytes, serve_env
from tests.promtext import parse, total

MAX_PIXELS = 250_000
JPEGS = [image_bytes("JPEG", (64 + 8 * i, 48 + 4 * i), seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("v2-store"))
    add_tiny_entry(store, "tiny", seed=0)
    add_near_copy(store, "tiny-b", of="tiny", noise=0.003, seed=1)
    return store


@pytest.fixture(scope="module")
def server(store):
    env = serve_env(
        store, max_delay_ms="2", max_image_pixels=MAX_PIXELS, ab_weights='{"tiny-b": 1}'
    )
    with running_server(env, timeout_s=120) as base:
        yield base


@pytest.fixture(scope="module")
def http(server):
    client = httpclient.InferenceServerClient(server.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def both(http, grpc):
    return [(httpclient, http), (grpcclient, grpc)]


def expected_probs(store: ModelStore, inputs_N3HW: torch.Tensor, name: str = "tiny"):
    module = store.load(name).module.eval()
    with torch.no_grad():
        return module(inputs_N3HW).float().softmax(-1)


def preprocessor(store: ModelStore) -> Preprocessor:
    return Preprocessor(store.manifest("tiny").preprocessing, MAX_PIXELS)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def infer(module, client, model, name, datatype, array, outputs, binary=True, **kw):
    tensor = module.InferInput(name, list(array.shape), datatype)
    if module is httpclient:
        tensor.set_data_from_numpy(array, binary_data=binary)
        asked = [module.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    else:
        tensor.set_data_from_numpy(array)
        asked = [module.InferRequestedOutput(o) for o in outputs]
    return client.infer(model, [tensor], outputs=asked, **kw)


# ---- health and metadata -------------------------------------------------------------------
def test_health_and_server_metadata(http, grpc):
    for client in (http, grpc):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tiny") and client.is_model_ready("vitserve")
        assert not client.is_model_ready("tiny", model_version="2")
    meta = http.get_server_metadata()
    assert meta["name"] == "vitserve" and "binary_tensor_data" in meta["extensions"]
    assert grpc.get_server_metadata().name == "vitserve"


def test_model_metadata_declares_the_three_inputs_and_outputs(http, grpc):
    meta = http.get_model_metadata("tiny")
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {
        "IMAGE": ("BYTES", [-1, 1]),
        "PIXELS": ("UINT8", [-1, -1, -1, 3]),
        "PREPROCESSED": ("FP32", [-1, 3, 32, 32]),
    }
    assert {t["name"] for t in meta["outputs"]} == {"TOPK_INDICES", "TOPK_SCORES", "PROBABILITIES"}
    g = grpc.get_model_metadata("tiny", as_json=True)
    assert [t["name"] for t in g["inputs"]] == [t["name"] for t in meta["inputs"]]
    assert sorted(http.get_model_metadata("vitserve")["versions"]) == ["tiny", "tiny-b"]
    config = grpc.get_model_config("tiny", as_json=True)["config"]
    assert int(config["max_batch_size"]) == 64 and all(i["optional"] for i in config["input"])
    assert http.get_model_config("tiny")["input"][0]["data_type"] == "TYPE_STRING"


# ---- inference --------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False])
def test_pixels_equal_the_eval_transform_run_here(store, http, grpc, binary):
    pre = preprocessor(store)
    image = pixels(JPEGS[0])
    batch = np.stack([image, image[::-1].copy()])  # the same size: one UINT8 tensor
    crops = torch.stack([pre.resize_crop(torch.from_numpy(x).permute(2, 0, 1)) for x in batch])
    want = expected_probs(store, pre.normalize(crops))
    for module, client in both(http, grpc):
        if module is grpcclient and not binary:
            continue
        result = infer(module, client, "tiny", "PIXELS", "UINT8", batch, ["PROBABILITIES"], binary)
        got = torch.from_numpy(result.as_numpy("PROBABILITIES"))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("binary", [True, False])
def test_preprocessed_equals_the_model_run_here(store, http, grpc, binary):
    pre = preprocessor(store)
    inputs = torch.stack([pre(data) for data in JPEGS])
    want = expected_probs(store, inputs)
    top = want.topk(3)
    for module, client in both(http, grpc):
        result = infer(
            module,
            client,
            "tiny",
            "PREPROCESSED",
            "FP32",
            inputs.numpy(),
            ["TOPK_INDICES", "TOPK_SCORES", "PROBABILITIES"],
            binary,
            parameters={"top_k": 3},
        )
        torch.testing.assert_close(
            torch.from_numpy(result.as_numpy("PROBABILITIES")), want, atol=1e-5, rtol=1e-4
        )
        assert result.as_numpy("TOPK_INDICES").tolist() == top.indices.tolist()
        np.testing.assert_allclose(result.as_numpy("TOPK_SCORES"), top.values, rtol=1e-4)


def test_bytes_match_classify_and_default_to_top5(server, http, grpc):
    array = np.array([[j] for j in JPEGS], dtype=np.object_)
    classify = [
        httpx.post(f"{server}/classify?model=tiny", content=j).json()["results"][0] for j in JPEGS
    ]
    top5 = [[p["index"] for p in r["predictions"]] for r in classify]
    for module, client in both(http, grpc):
        tensor = module.InferInput("IMAGE", [len(JPEGS), 1], "BYTES")
        tensor.set_data_from_numpy(array)
        result = client.infer("tiny", [tensor])  # no outputs named: the top-5 pair
        assert result.as_numpy("TOPK_INDICES").tolist() == top5
        assert result.as_numpy("PROBABILITIES") is None


def test_classification_parameter_gives_score_index_label(http, grpc):
    array = np.array([JPEGS[0]], dtype=np.object_)
    for module, client in both(http, grpc):
        tensor = module.InferInput("IMAGE", [1], "BYTES")
        tensor.set_data_from_numpy(array)
        asked = module.InferRequestedOutput("PROBABILITIES", class_count=2)
        result = client.infer("tiny", [tensor], outputs=[asked])
        rows = result.as_numpy("PROBABILITIES")
        assert rows.shape == (1, 2)
        score, index, label = rows[0][0].decode().split(":", 2)
        assert 0 < float(score) <= 1 and int(index) >= 0 and label


def test_version_or_parameter_names_the_variant_else_ab_routes(http, grpc):
    array = np.array([[JPEGS[0]]], dtype=np.object_)
    for module, client in both(http, grpc):
        tensor = module.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(array)
        pinned = client.infer("vitserve", [tensor], model_version="tiny")
        by_parameter = client.infer("vitserve", [tensor], parameters={"model": "tiny"})
        routed = client.infer("vitserve", [tensor])  # A/B weights: all to tiny-b
        names = [response_of(module, r)["model_name"] for r in (pinned, by_parameter)]
        assert names == ["tiny", "tiny"]
        response = response_of(module, routed)
        assert response["model_name"] == "tiny-b"
        assert response["parameters"]["routed_by"] in ("ab", {"string_param": "ab"})


def test_compare_parameter_reports_agreement_with_each_candidate(store, http, grpc):
    pre = preprocessor(store)
    inputs = torch.stack([pre(data) for data in JPEGS]).numpy()
    want = expected_probs(store, torch.from_numpy(inputs), "tiny").argmax(-1)
    other = expected_probs(store, torch.from_numpy(inputs), "tiny-b").argmax(-1)
    agreement = (want == other).float().mean().item()
    for module, client in both(http, grpc):
        for name, datatype, array in [
            ("PREPROCESSED", "FP32", inputs),
            ("IMAGE", "BYTES", np.array(JPEGS, dtype=np.object_)),
        ]:
            result = infer(
                module,
                client,
                "vitserve",
                name,
                datatype,
                array,
                ["TOPK_INDICES"],
                parameters={"compare": "tiny-b,tiny"},
            )
            parameters = response_of(module, result)["parameters"]
            figure = parameters["tiny-b.top1_agreement"]
            assert figure == pytest.approx(agreement) or figure == {"double_param": agreement}
            assert response_of(module, result)["model_name"] == "tiny-b"  # the A/B arm
            if name == "PREPROCESSED":
                assert result.as_numpy("TOPK_INDICES")[:, 0].tolist() == other.tolist()


def response_of(module, result) -> dict:
    """The response as JSON (gRPC's parameters keep their protobuf form)."""
    return result.get_response() if module is httpclient else result.get_response(as_json=True)


# ---- errors ------------------------------------------------------------------------------------
def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


HTTP_TO_GRPC = {
    "400": "StatusCode.INVALID_ARGUMENT",
    "404": "StatusCode.NOT_FOUND",
    "413": "StatusCode.INVALID_ARGUMENT",
}


@pytest.mark.parametrize(
    "model, name, datatype, array, status",
    [
        ("nope", "IMAGE", "BYTES", np.array([JPEGS[0]], dtype=np.object_), "404"),
        ("tiny", "PIXELS", "UINT8", np.zeros((1, 8, 8, 4), np.uint8), "400"),  # 4 channels
        ("tiny", "PREPROCESSED", "FP32", np.zeros((1, 3, 16, 16), np.float32), "400"),
        ("tiny", "PREPROCESSED", "FP64", np.zeros((1, 3, 32, 32)), "400"),  # datatype
        ("tiny", "OTHER", "FP32", np.zeros((1, 3, 32, 32), np.float32), "400"),
        ("tiny", "IMAGE", "BYTES", np.array([b"not an image"], dtype=np.object_), "415"),
        ("tiny", "PIXELS", "UINT8", np.zeros((1, 600, 500, 3), np.uint8), "413"),  # > limit
        ("tiny", "PIXELS", "UINT8", np.zeros((1, 1, 20_000, 3), np.uint8), "413"),  # 1:20000
        (  # a decompression bomb: small PNG, many pixels
            "tiny",
            "IMAGE",
            "BYTES",
            np.array([image_bytes("PNG", (600, 500), mode="L")], dtype=np.object_),
            "413",
        ),
        ("tiny", "IMAGE", "BYTES", np.array([JPEGS[0]] * 65, dtype=np.object_), "400"),
    ],
)
def test_errors_carry_the_v2_status(http, grpc, model, name, datatype, array, status):
    assert status_of(lambda: infer(httpclient, http, model, name, datatype, array, [])) == status
    code = HTTP_TO_GRPC.get(status, "StatusCode.INVALID_ARGUMENT")
    assert status_of(lambda: infer(grpcclient, grpc, model, name, datatype, array, [])) == code


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        {"inputs": []},
        {"inputs": [{"name": "IMAGE", "datatype": ["BYTES"], "shape": [1], "data": ["x"]}]},
        {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": 3}]},
        {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [1]}]},
        {
            "inputs": [
                {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1] * 3}
            ],
            "outputs": 7,
        },
    ],
)
def test_malformed_bodies_get_a_v2_400(server, body):
    content = body if isinstance(body, bytes) else json.dumps(body)
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=content)
    assert r.status_code == 400 and set(r.json()) == {"error"}


def test_v2_calls_count_in_metrics_by_route_and_status(server, grpc):
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=json.dumps({"inputs": []}))
    assert r.status_code == 400 and set(r.json()) == {"error"}
    one = np.array([JPEGS[0]], dtype=np.object_)
    infer(grpcclient, grpc, "tiny", "IMAGE", "BYTES", one, [])
    status_of(lambda: infer(grpcclient, grpc, "nope", "IMAGE", "BYTES", one, []))
    samples = parse(httpx.get(f"{server}/metrics").text)
    assert total(samples, "vitserve_requests_total", route="/v2/models/{name}/infer", status="400")
    assert total(samples, "vitserve_requests_total", route="grpc:ModelInfer", status="OK")
    assert total(samples, "vitserve_requests_total", route="grpc:ModelInfer", status="NOT_FOUND")


@pytest.fixture(scope="module")
def tight_server(store):
    """One image in the queue at most, and a deadline (1 ms) that has always passed before a
    batch runs: a batch waits its full 200 ms, whatever the machine's speed, since the test's
    requests never fill it (an image a refused request left queued, and the next request's
    image, make 2 of 4; a batch of 2 would close at once and could beat the deadline)."""
    env = serve_env(
        store, queue_size=1, max_batch_size=4, max_delay_ms=200, request_timeout_s="0.001"
    )
    with running_server(env, timeout_s=120) as base:
        yield base


def test_overload_is_429_with_retry_after_and_deadline_504(tight_server):
    http = httpclient.InferenceServerClient(tight_server.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{tight_server.grpc_port}")
    three = np.array([JPEGS[0]] * 3, dtype=np.object_)  # the second one finds the queue full
    one = three[:1]
    assert status_of(lambda: infer(httpclient, http, "tiny", "IMAGE", "BYTES", three, [])) == "429"
    assert status_of(lambda: infer(httpclient, http, "tiny", "IMAGE", "BYTES", one, [])) == "504"
    overloaded = status_of(lambda: infer(grpcclient, grpc, "tiny", "IMAGE", "BYTES", three, []))
    assert overloaded == "StatusCode.RESOURCE_EXHAUSTED"
    late = status_of(lambda: infer(grpcclient, grpc, "tiny", "IMAGE", "BYTES", one, []))
    assert late == "StatusCode.DEADLINE_EXCEEDED"
    body = {
        "inputs": [
            {"name": "PIXELS", "datatype": "UINT8", "shape": [3, 8, 8, 3], "data": [0] * 576}
        ]
    }
    r = httpx.post(f"{tight_server}/v2/models/tiny/infer", json=body)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "error" in r.json()
