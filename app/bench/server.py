"""Start a real ``vitserve serve`` process on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerURL(str):
    """The base URL (a plain ``str`` to existing callers) that also knows its process, so a
    test can read the server's memory or signal it."""

    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def running_server(
    env: dict[str, str], timeout_s: float = 300, ready_streak: int = 1
) -> Iterator[ServerURL]:
    """Yield the base URL once /readyz answers 200 ``ready_streak`` times in a row (each on a
    fresh connection: with several workers, any one may answer); stop with SIGINT after."""
    port = free_port()
    full_env = {**os.environ, **env, "VITSERVE_HOST": "127.0.0.1", "VITSERVE_PORT": str(port)}
    full_env.setdefault("VITSERVE_LOG_LEVEL", "warning")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = ServerURL(f"http://127.0.0.1:{port}")
    base.proc = proc
    try:
        deadline, streak = time.monotonic() + timeout_s, 0
        while streak < ready_streak:
            if proc.poll() is not None:
                output = proc.stdout.read().decode()
                raise RuntimeError(f"server exited {proc.returncode}: {output}")
            try:
                ok = httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                ok = False
            streak = streak + 1 if ok else 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not become ready in {timeout_s:.0f}s")
            time.sleep(0.02 if ok else 0.2)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.stdout.close()
