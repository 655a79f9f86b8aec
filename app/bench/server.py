"""Start a real ``vitserve serve`` process on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
LOG_TAIL_LINES = 200  # of the server's output, shown when the code using it fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerURL(str):
    """The base URL (a plain ``str`` to existing callers) that also knows its process, so a
    test can read the server's memory or signal it."""

    proc: subprocess.Popen
    grpc_port: int  # the Open Inference Protocol's gRPC port (0: disabled)

    @property
    def pid(self) -> int:
        return self.proc.pid


def _ready(base: str, workers: int) -> bool:
    try:
        if httpx.get(f"{base}/readyz", timeout=2).status_code != 200:
            return False
        if workers == 1:
            return True
        text = httpx.get(f"{base}/metrics", timeout=5).text
    except httpx.TransportError:
        return False
    ready = sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vitserve_workers_ready"
    )
    return ready >= workers


@contextmanager
def running_server(
    env: dict[str, str], timeout_s: float = 300, workers: int = 1
) -> Iterator[ServerURL]:
    """Yield the base URL once /readyz answers 200 and, with several ``workers``, once
    /metrics counts that many ready (one /readyz answer speaks for one worker); stop with
    SIGINT (graceful) after. Where it never gets ready or the code inside fails, the
    server's last log lines go to stderr (a test shows them beside its failure)."""
    port = free_port()
    # a free gRPC port too, unless set: servers running side by side must not share 8001
    grpc_port = int(env.get("VITSERVE_GRPC_PORT", free_port()))
    full_env = {
        **os.environ,
        **env,
        "VITSERVE_HOST": "127.0.0.1",
        "VITSERVE_PORT": str(port),
        "VITSERVE_GRPC_PORT": str(grpc_port),
    }
    full_env.setdefault("VITSERVE_LOG_LEVEL", "warning")
    # A file, not a pipe: nobody reads the output while the server runs, and a full pipe
    # blocks whichever of its processes (workers, engines) logs next.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        cwd=REPO,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = ServerURL(f"http://127.0.0.1:{port}")
    base.proc, base.grpc_port = proc, grpc_port
    failed = False
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(base, workers):
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited {proc.returncode}: {log.read().decode()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not become ready in {timeout_s:.0f}s")
            time.sleep(0.2)
        yield base
    except BaseException:  # never ready, or the code inside failed
        failed = True  # what the server said goes to stderr, once it has stopped
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if failed:
            log.seek(0)
            tail = log.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            print("\n".join(["--- the server's log, last lines ---", *tail]), file=sys.stderr)
        log.close()
