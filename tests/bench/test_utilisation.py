"""Host and GPU busy shares of the service benchmark: /proc/stat parsing, and a window
that measures real load (CPU only here; the GPU share needs NVML)."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from app.bench.utilisation import Utilisation, cpu_times


def test_cpu_times_count_idle_and_iowait_as_not_busy(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 10 50 800 40 0 0 0 30 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert cpu_times(stat) == (160, 1000)  # guest time is already counted in user
    assert cpu_times(tmp_path / "missing") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_a_busy_window_reads_as_busy():
    with Utilisation() as busy:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # one core spinning
            pass
    assert busy.cpu_busy is not None and 0 < busy.cpu_busy <= 1
    if not torch.cuda.is_available():
        assert busy.gpu_busy is None
