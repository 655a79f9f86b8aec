"""How busy the host's cores and the GPU were while a load level ran.

A service that delivers less than its model could is bound by something: when the cores
are all busy it is the host (HTTP, decoding, the client), when the GPU is busy it is the
device (the forward, nvjpeg, or contexts time-slicing), and when neither is, it is latency
in the request path itself. The load client runs on the same machine, so the CPU share
includes it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

import torch

GPU_SAMPLE_S = 0.2  # NVML's utilisation covers the last 1/6 s to 1 s


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot; None off Linux."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    total = user + nice + system + idle + iowait + irq + softirq + steal  # guest is in user
    return total - idle - iowait, total


class Utilisation:
    """Context manager: ``cpu_busy`` and ``gpu_busy`` (0..1, None where unreadable) over
    its block. The GPU share is the mean of NVML samples over every visible GPU."""

    def __init__(self) -> None:
        self.cpu_busy: float | None = None
        self.gpu_busy: float | None = None
        self._cpu_start: tuple[int, int] | None = None
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        self._cpu_start = cpu_times()
        if torch.cuda.is_available():
            self._sampler = threading.Thread(target=self._sample_gpu, daemon=True)
            self._sampler.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        end = cpu_times()
        if self._cpu_start and end and end[1] > self._cpu_start[1]:
            busy, total = (e - s for e, s in zip(end, self._cpu_start, strict=True))
            self.cpu_busy = busy / total
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.gpu_busy = sum(self._samples) / len(self._samples) if self._samples else None

    def _sample_gpu(self) -> None:
        while not self._stop.wait(GPU_SAMPLE_S):
            try:
                shares = [torch.cuda.utilization(i) / 100 for i in range(torch.cuda.device_count())]
            except Exception:  # noqa: BLE001 - NVML absent (no nvidia-ml-py): no GPU share
                return
            self._samples.append(sum(shares) / len(shares))
