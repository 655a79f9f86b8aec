"""The server imports no training, job or benchmark code (#24).

A serving process should load the request path and the model code, nothing that trains,
measures or reports: those pull in heavy dependencies, and an import from them is how the
request path grows to know about training. Checked in a fresh interpreter, since this test
session has imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from app.store import ModelStore
from app.vit.config import CompressionConfig
from tests.helpers import REPO, add_tiny_entry, serve_env

FORBIDDEN = ("app.train", "app.jobs", "app.bench", "app.timing")
SERVER_PACKAGES = ("app.api", "app.serving", "app.experiments", "app.store", "app.vit")

# `vitserve serve` up to a ready server (uvicorn.run replaced by the app's own lifespan, so
# the models load and warm up as served), then every module of the server's packages.
PROBE = f"""
import importlib, json, pkgutil, sys, time
import uvicorn
from starlette.testclient import TestClient

def run(app, **_):
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/models").text
            time.sleep(0.2)

uvicorn.run = run
from app.cli import main
try:
    main(["serve"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
for name in {SERVER_PACKAGES!r}:
    package = importlib.import_module(name)
    for module in pkgutil.walk_packages(package.__path__, name + "."):
        importlib.import_module(module.name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("app."))))
"""


def test_serving_imports_no_training_jobs_or_benchmarks(tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    add_tiny_entry(
        store, "tiny-merged", variant="compressed", compression=CompressionConfig.parse("merge=2")
    )
    # inline: the models load and warm up in this process (with engines, in theirs; the
    # engine's own modules are among the server packages imported below)
    env = {**os.environ, **serve_env(store, engine="inline"), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "app.api.app" in loaded and "app.vit.merge" in loaded  # the probe did serve
    assert [m for m in loaded if m.startswith(FORBIDDEN)] == []
