"""Host and GPU busy shares of the service benchmark: /proc/stat parsing, the cores each
side (load client, HTTP server, engine) used, and a window that measures real load (CPU
only here; the GPU share needs NVML)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from app.bench.utilisation import Utilisation, cpu_times, processes, roles


def test_cpu_times_count_idle_and_iowait_as_not_busy(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 10 50 800 40 0 0 0 30 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert cpu_times(stat) == (160, 1000)  # guest time is already counted in user
    assert cpu_times(tmp_path / "missing") is None


def test_each_process_is_on_the_side_of_the_tree_it_belongs_to():
    table = {
        1: (0, 0, "init"),
        10: (1, 0, "python -m app bench service"),  # the bench: the client's root
        11: (10, 0, "python -m app bench service"),  # a client process
        20: (10, 0, "python -m app serve"),  # the server it started
        21: (20, 0, "python -m app.serving.engine --socket /tmp/e.sock"),
        22: (20, 0, "python -c from multiprocessing.spawn import spawn_main"),  # HTTP worker
        30: (1, 0, "sshd"),  # neither
    }
    assert roles(table, server_pid=20, client_pid=10) == {
        10: "client",
        11: "client",
        20: "server",
        21: "engine",
        22: "server",
    }
    assert roles(table, server_pid=None, client_pid=10) == {
        10: "client",
        11: "client",
        20: "client",
        21: "client",
        22: "client",
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_the_cores_a_spinning_server_uses_are_counted_as_its_own():
    spin = "import time\nend = time.time() + 5\nwhile time.time() < end: pass"
    server = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # started and spinning
        assert server.pid in processes()
        with Utilisation(server.pid) as busy:
            time.sleep(1.0)
    finally:
        server.kill()
        server.wait()
    assert busy.cores is not None
    assert 0.5 < busy.cores["server"] <= 1.1  # one core, spinning
    assert busy.cores["client"] < 0.5  # this process slept
    assert busy.cores["engine"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_a_busy_window_reads_as_busy():
    with Utilisation() as busy:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # one core spinning
            pass
    assert busy.cpu_busy is not None and 0 < busy.cpu_busy <= 1
    if not torch.cuda.is_available():
        assert busy.gpu_busy is None
