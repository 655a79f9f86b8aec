"""Several worker processes, one metrics view: prometheus_client's multiprocess mode.

Two real processes write into one PROMETHEUS_MULTIPROC_DIR (the variable must be set
before prometheus_client is imported, hence subprocesses); the aggregate is read back
through ``Metrics.scrape`` as /metrics would serve it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from app.serving.metrics import Metrics
from tests.helpers import REPO
from tests.promtext import parse, value

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from app.experiments.agreement import agreement
    from app.serving.metrics import Metrics

    i = int(sys.argv[1])
    m = Metrics()
    m.requests.labels("tiny", "/classify", "200").inc(10 * i)
    m.request_latency.labels("tiny", "/classify", "200").observe(0.01 * i)
    m.images.labels("tiny").inc(i)
    m.queue_depth.labels("tiny").set(3 * i)
    m.in_flight.inc()
    m.gpu_allocated.labels("0").set(100 * i)
    m.model_info.labels("tiny", "dense", "vit", "none", "none", "none", "float32", "cpu").set(1)
    p = torch.tensor([0.6, 0.4])
    m.record_agreement("shadow", "tiny", "tiny-b", agreement(p, p if i == 1 else p.flip(0)))
    print("ready", flush=True)
    sys.stdin.readline()  # hold the live gauges until told to go
    m.process_exiting()
    """
)


def start_worker(i: int, path: str) -> subprocess.Popen:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": path, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(i)],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(30) == 0


def aggregate(monkeypatch, path: str):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", path)
    body, content_type = Metrics().scrape()
    assert content_type.startswith("text/plain")
    return parse(body.decode())


def test_two_worker_processes_aggregate_into_one_view(tmp_path, monkeypatch):
    path = str(tmp_path)
    workers = [start_worker(i, path) for i in (1, 2)]
    try:
        for w in workers:
            assert w.stdout.readline().strip() == "ready"
        samples = aggregate(monkeypatch, path)
        labels = {"model": "tiny", "route": "/classify", "status": "200"}
        assert value(samples, "vitserve_requests_total", **labels) == 30
        assert value(samples, "vitserve_request_duration_seconds_count", **labels) == 2
        assert value(samples, "vitserve_request_duration_seconds_sum", **labels) == (
            pytest.approx(0.03)
        )
        assert value(samples, "vitserve_images_total", model="tiny") == 3
        # livesum gauges add up over processes, with no per-process (pid) series
        assert value(samples, "vitserve_queue_depth", model="tiny") == 9
        assert value(samples, "vitserve_requests_in_flight") == 2
        assert value(samples, "vitserve_gpu_memory_allocated_bytes", gpu="0") == 300
        assert not any("pid" in dict(lbl) for _, lbl in samples)
        # model info (livemax): one series, not one per process
        info = [lbl for name, lbl in samples if name == "vitserve_model_info"]
        assert len(info) == 1 and dict(info[0])["model"] == "tiny"
        pair = {"mode": "shadow", "reference": "tiny", "candidate": "tiny-b"}
        assert value(samples, "vitserve_agreement_total", **pair, outcome="agree") == 1
        assert value(samples, "vitserve_agreement_total", **pair, outcome="disagree") == 1

        stop(workers[1])  # a worker that exits leaves the live gauges, not the counters
        samples = aggregate(monkeypatch, path)
        assert value(samples, "vitserve_queue_depth", model="tiny") == 3
        assert value(samples, "vitserve_requests_in_flight") == 1
        assert value(samples, "vitserve_requests_total", **labels) == 30
    finally:
        for w in workers:
            if w.poll() is None:
                stop(w)
