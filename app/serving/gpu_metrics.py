"""Device-wide GPU figures read through NVML at scrape time.

Utilisation and memory used are properties of the device, not of a process, so they are
right whichever worker answers the scrape (unlike torch's per-process allocator figures,
which :meth:`Metrics.sample_gpu_memory` records as summed gauges instead). torch's NVML
wrappers are used because they map CUDA indices to NVML ones under
``CUDA_VISIBLE_DEVICES``; they need the optional ``nvidia-ml-py`` package (the ``gpu``
extra). Without CUDA or without NVML the collector yields nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    utilization = GaugeMetricFamily(
        "vitserve_gpu_utilization_ratio",
        "Share of the last sample period in which a kernel ran on the GPU (NVML).",
        labels=["gpu"],
    )
    used = GaugeMetricFamily(
        "vitserve_gpu_memory_used_bytes",
        "GPU memory used on the device by every process (NVML).",
        labels=["gpu"],
    )
    return utilization, used


class GpuCollector(Collector):
    def __init__(self) -> None:
        self._warned = False

    def describe(self) -> list[Metric]:
        """The families without samples: registering must not touch NVML."""
        return list(families())

    def collect(self) -> Iterator[Metric]:
        if not torch.cuda.is_available():
            return
        utilization, used = families()
        for index in range(torch.cuda.device_count()):
            try:
                utilization.add_metric([str(index)], torch.cuda.utilization(index) / 100)
                used.add_metric([str(index)], torch.cuda.device_memory_used(index))
            except Exception as exc:  # noqa: BLE001 - NVML absent or failing: no figures
                if not self._warned:
                    log.warning("no NVML GPU metrics (pip install nvidia-ml-py): %s", exc)
                    self._warned = True
                return
        yield utilization
        yield used
