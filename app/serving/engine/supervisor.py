"""Start the engine processes (``engines_per_device`` per device), restart one that dies,
stop them after the HTTP workers have drained."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from app.config import Settings
from app.serving.engine.pool import SOCKETS_ENV

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # between restarts of an engine that keeps dying
STABLE_S = 60.0  # an engine up this long restarts with the shortest wait again


class EngineProcess:
    """One engine: its device, socket and current process."""

    def __init__(self, settings: Settings, device: str | None, socket_path: Path) -> None:
        overrides = {"replica_devices": [device]} if device else {}
        self.settings_json = json.dumps(settings.model_dump(mode="json") | overrides)
        self.socket_path = socket_path
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0

    def spawn(self) -> None:
        env = os.environ | {"VITSERVE_ENGINE_SETTINGS": self.settings_json}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.serving.engine", "--socket", str(self.socket_path)],
            env=env,
            start_new_session=True,  # Ctrl+C reaches the workers, which drain first
        )
        self.started = time.monotonic()
        log.info("engine %d started (%s)", self.proc.pid, self.socket_path.name)


class EngineSupervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._dir = tempfile.TemporaryDirectory(prefix="vitserve-engine-")
        devices: list[str | None] = [
            device
            for device in settings.replica_devices or [None]
            for _ in range(settings.engines_per_device)
        ]
        self.engines = [
            EngineProcess(settings, device, Path(self._dir.name) / f"engine-{i}.sock")
            for i, device in enumerate(devices)
        ]
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="engine-watch", daemon=True)

    @property
    def sockets_env(self) -> dict[str, str]:
        """What HTTP workers need to find the engines."""
        return {SOCKETS_ENV: os.pathsep.join(str(e.socket_path) for e in self.engines)}

    def start(self) -> None:
        for engine in self.engines:
            engine.spawn()
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            for engine in self.engines:
                code = engine.proc.poll()
                if code is None or self._stopping.is_set():
                    continue
                alive = time.monotonic() - engine.started
                engine.failures = 0 if alive > STABLE_S else engine.failures + 1
                wait = BACKOFF_S[min(engine.failures, len(BACKOFF_S) - 1)]
                log.error(
                    "engine %d exited (code %s) after %.0f s; restarting in %.1f s",
                    engine.proc.pid,
                    code,
                    alive,
                    wait,
                )
                if self._stopping.wait(wait):
                    return
                engine.spawn()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM every engine (each finishes what is queued), then kill what is left."""
        self._stopping.set()
        for engine in self.engines:
            if engine.proc and engine.proc.poll() is None:
                engine.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for engine in self.engines:
            if engine.proc is None:
                continue
            try:
                engine.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("engine %d did not stop in %.0f s; killed", engine.proc.pid, timeout_s)
                engine.proc.kill()
                engine.proc.wait()
        self._dir.cleanup()
