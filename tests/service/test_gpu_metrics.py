"""GPU metrics: nothing without CUDA; with torch's CUDA and NVML queries stubbed, the series
a GPU host exports; and on a real GPU (device runs), those series from a real server."""

from __future__ import annotations

import httpx
import pytest
import torch

from app.bench.server import running_server
from app.serving.gpu_metrics import GpuCollector
from app.serving.metrics import Metrics
from app.store import ModelStore
from tests.helpers import add_tiny_entry, image_bytes, serve_env
from tests.promtext import parse, value

JPEG = {"content-type": "image/jpeg"}


def gpu_samples(metrics: Metrics) -> dict:
    return {k: v for k, v in parse(metrics.scrape()[0].decode()).items() if "gpu" in k[0]}


def test_cpu_only_host_exports_no_gpu_series(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert list(GpuCollector().collect()) == []
    assert gpu_samples(Metrics()) == {}


def test_nvml_figures_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "utilization", lambda i: [35, 80][i])
    monkeypatch.setattr(torch.cuda, "device_memory_used", lambda i: [1e9, 2e9][i])
    samples = gpu_samples(Metrics())
    assert value(samples, "vitserve_gpu_utilization_ratio", gpu="0") == 0.35
    assert value(samples, "vitserve_gpu_utilization_ratio", gpu="1") == 0.8
    assert value(samples, "vitserve_gpu_memory_used_bytes", gpu="1") == 2e9


def test_without_nvml_the_collector_yields_nothing_and_warns_once(monkeypatch, caplog):
    def no_nvml(_):
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    collector = GpuCollector()
    assert list(collector.collect()) == [] and list(collector.collect()) == []
    assert sum("nvidia-ml-py" in r.getMessage() for r in caplog.records) == 1


def test_torch_allocator_figures_are_sampled_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 1000 * (i + 1))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 4000 * (i + 1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no NVML collector
    metrics = Metrics()
    metrics.sample_gpu_memory(torch.device("cuda", 1))
    samples = gpu_samples(metrics)
    assert value(samples, "vitserve_gpu_memory_allocated_bytes", gpu="1") == 2000
    assert value(samples, "vitserve_gpu_memory_reserved_bytes", gpu="1") == 8000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_cuda_server_exports_gpu_memory_and_utilisation(tmp_path):
    """No stubs: a server on the GPU, one request, then its /metrics read as text."""
    store = ModelStore(tmp_path)
    add_tiny_entry(store, "tiny")
    env = serve_env(store, device="cuda")
    with running_server(env) as base:
        r = httpx.post(f"{base}/classify", content=image_bytes("JPEG"), headers=JPEG)
        assert r.status_code == 200, r.text
        samples = parse(httpx.get(f"{base}/metrics").text)
    assert value(samples, "vitserve_gpu_memory_allocated_bytes", gpu="0") > 0
    assert value(samples, "vitserve_gpu_memory_reserved_bytes", gpu="0") > 0
    assert value(samples, "vitserve_gpu_memory_used_bytes", gpu="0") > 0  # NVML
    assert 0 <= value(samples, "vitserve_gpu_utilization_ratio", gpu="0") <= 1
