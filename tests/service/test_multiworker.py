"""``uvicorn --factory app.api.app:create_app --workers 2`` with PROMETHEUS_MULTIPROC_DIR:
whichever worker answers /metrics reports the whole server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from app.bench.server import free_port, running_server
from app.store import ModelStore
from tests.helpers import REPO, add_tiny_entry, image_bytes, serve_env
from tests.promtext import parse, total, value

REQUESTS = 24
JPEG = {"content-type": "image/jpeg"}


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Ready when 10 fresh connections in a row get 200 (both workers have loaded)."""
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 10:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "workers did not become ready"
        try:
            ok = httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            ok = False
        streak = streak + 1 if ok else 0
        time.sleep(0.05 if ok else 0.2)


def test_two_workers_report_one_aggregate(tmp_path):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "VITSERVE_STORE_DIR": str(store.root),
        "VITSERVE_DEFAULT_MODEL": "tiny",
        "VITSERVE_AUTO_PULL": "false",
        "VITSERVE_DEVICE": "cpu",
        "VITSERVE_MAX_BATCH_SIZE": "4",  # a shorter warm-up: two workers share two cores
        "VITSERVE_GRPC_PORT": str(free_port()),  # not 8001, which another server may hold
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.api.app:create_app"]
    proc = subprocess.Popen(
        [*command, "--workers", "2", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        statuses = [
            httpx.post(  # a fresh connection each: the kernel spreads them over the workers
                f"{base}/classify", content=image_bytes(), headers={"content-type": "image/jpeg"}
            ).status_code
            for _ in range(REQUESTS)
        ]
        assert statuses == [200] * REQUESTS
        # every scrape, from whichever worker, sees all requests
        for _ in range(5):
            samples = parse(httpx.get(f"{base}/metrics").text)
            assert total(samples, "vitserve_requests_total", route="/classify") == REQUESTS
            assert value(samples, "vitserve_images_total", model="tiny") == REQUESTS
            assert value(samples, "vitserve_requests_in_flight") == 1  # this scrape itself
            info = [lbl for name, lbl in samples if name == "vitserve_model_info"]
            assert len(info) == 1
        pids = {f.stem.rsplit("_", 1)[1] for f in metrics_dir.glob("counter_*.db")}
        assert len(pids) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    # graceful exit marked both workers dead: no live gauge is left to be summed
    assert not list(metrics_dir.glob("gauge_live*.db"))


def test_vitserve_serve_workers_share_one_metrics_view(tmp_path):
    """`VITSERVE_WORKERS=2 vitserve serve`: the CLI starts the workers and gives them a
    metrics folder of its own, so any worker's /metrics counts every request. Both workers
    bind the gRPC port too (SO_REUSEPORT; a failed bind would stop a worker from getting
    ready), and gRPC calls count in the same aggregate."""
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    env = serve_env(store, workers=2, max_batch_size=4)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with running_server(env, workers=2) as base:
        for _ in range(REQUESTS):
            r = httpx.post(f"{base}/classify", content=image_bytes(), headers=JPEG)
            assert r.status_code == 200
        for _ in range(5):
            samples = parse(httpx.get(f"{base}/metrics").text)
            assert value(samples, "vitserve_images_total", model="tiny") == REQUESTS
            assert value(samples, "vitserve_workers_ready") == 2
        for _ in range(REQUESTS):  # a fresh channel each: the kernel spreads them
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{base.grpc_port}")
            image = grpcclient.InferInput("IMAGE", [1], "BYTES")
            image.set_data_from_numpy(np.array([image_bytes()], dtype=np.object_))
            assert client.infer("tiny", [image]).as_numpy("TOPK_INDICES").shape == (1, 5)
            client.close()
        samples = parse(httpx.get(f"{base}/metrics").text)
        assert total(samples, "vitserve_requests_total", route="grpc:ModelInfer") == REQUESTS


def test_granian_serves_the_same_app_through_the_engine_and_stops_cleanly(tmp_path):
    """VITSERVE_HTTP_SERVER=granian: the same FastAPI app under granian's workers, feeding
    the engine; /metrics aggregates them, and SIGINT stops every process with exit 0."""
    pytest.importorskip("granian", reason="granian is the `granian` extra")
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    env = serve_env(store, workers=2, max_batch_size=4, engine="process", http_server="granian")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with running_server(env, workers=2) as base:
        for _ in range(REQUESTS):
            r = httpx.post(f"{base}/classify", content=image_bytes(), headers=JPEG)
            assert r.status_code == 200
            assert r.json()["results"][0]["predictions"]
        samples = parse(httpx.get(f"{base}/metrics").text)
        assert value(samples, "vitserve_images_total", model="tiny") == REQUESTS
        assert value(samples, "vitserve_workers_ready") == 2
        assert httpx.post(f"{base}/classify", content=b"no image", headers=JPEG).status_code in (
            400,
            415,
        )
        proc = base.proc
    proc.wait(30)
    assert proc.returncode == 0
