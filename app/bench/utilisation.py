"""How busy the host's cores and the GPU were while a load level ran.

A service that delivers less than its model could is bound by something: when the cores
are all busy it is the host (HTTP, decoding, the client), when the GPU is busy it is the
device (the forward, nvjpeg, or contexts time-slicing), and when neither is, it is latency
in the request path itself. The load client runs on the same machine, so the CPU share
includes it; the cores each side used (client, HTTP server, engine) say which one it is.
"""

from __future__ import annotations

import os
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


ENGINE_MODULE = "app.serving.engine"


def processes(proc: Path = Path("/proc")) -> dict[int, tuple[int, int, str]]:
    """Every process: pid -> (parent pid, CPU jiffies used, its command line); {} off Linux."""
    found = {}
    for entry in proc.glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # past "pid (comm) "; comm may hold spaces
        found[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), cmdline)
    return found


def roles(
    table: dict[int, tuple[int, int, str]], server_pid: int | None, client_pid: int
) -> dict[int, str]:
    """Which side each process is on: ``engine`` (the server's engine processes), ``server``
    (the rest of the server's tree: HTTP workers, their supervisor) or ``client`` (the rest
    of ``client_pid``'s tree: the load generator)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)

    def tree(root: int) -> list[int]:
        out, todo = [], [root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    side = {pid: "client" for pid in tree(client_pid) if pid in table}
    if server_pid is not None and server_pid in table:
        for pid in tree(server_pid):
            side[pid] = "engine" if ENGINE_MODULE in table[pid][2] else "server"
    return side


class Utilisation:
    """Context manager: ``cpu_busy`` and ``gpu_busy`` (0..1, None where unreadable) over
    its block, and ``cores``: the cores each side (see :func:`roles`) kept busy on average.
    The GPU share is the mean of NVML samples over every visible GPU."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.cpu_busy: float | None = None
        self.gpu_busy: float | None = None
        self.cores: dict[str, float] | None = None
        self._server_pid = server_pid
        self._procs_start: dict[int, tuple[int, int, str]] = {}
        self._cpu_start: tuple[int, int] | None = None
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        self._procs_start = processes()
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
            self.cores = self._cores(processes(), total / (os.cpu_count() or 1))
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.gpu_busy = sum(self._samples) / len(self._samples) if self._samples else None

    def _cores(self, end: dict[int, tuple[int, int, str]], wall: float) -> dict[str, float]:
        """Jiffies each side used over the block / wall jiffies (processes alive at both
        ends: the server's and the client's are)."""
        used = dict.fromkeys(("client", "server", "engine"), 0.0)
        for pid, side in roles(end, self._server_pid, os.getpid()).items():
            if pid in self._procs_start:
                used[side] += end[pid][1] - self._procs_start[pid][1]
        return {side: jiffies / wall for side, jiffies in used.items()}

    def _sample_gpu(self) -> None:
        while not self._stop.wait(GPU_SAMPLE_S):
            try:
                shares = [torch.cuda.utilization(i) / 100 for i in range(torch.cuda.device_count())]
            except Exception:  # noqa: BLE001 - NVML absent (no nvidia-ml-py): no GPU share
                return
            self._samples.append(sum(shares) / len(shares))
