"""CI smoke load test: headless locust against a real server with tiny models.

Short and bounded (8 users, 8 s), so it catches a server that errors or falls over under
concurrent mixed traffic, not one that is merely slow. Locust's own exit code only says
"some request failed"; reading its CSV says which, and lets 5xx fail the test outright.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.bench.server import running_server
from app.store import ModelStore
from tests.helpers import REPO, add_tiny_entry, serve_env

# Never import locust here: it monkey-patches the pytest process with gevent.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust is not installed (.[test])"
)

MAX_ERROR_RATE = 0.01
MIN_REQUESTS = 20
# Tasks are drawn at random (compare has weight 1 of 9): with 100 requests the chance that
# a scenario never ran is below 1e-5; an idle runner sends ~150-200, a loaded one fewer.
SCENARIO_CHECK_REQUESTS = 100


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("store"))
    add_tiny_entry(store, "tiny", seed=0)
    add_tiny_entry(store, "tiny-b", seed=1)
    env = serve_env(
        store,
        max_delay_ms="5",
    )
    with running_server(env, timeout_s=120) as base:
        yield base


def locust_env() -> dict[str, str]:
    """The locustfile imports ``app``: found from the checkout, installed or not."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(90)
def test_headless_locust_mixed_traffic_has_no_server_errors(server, tmp_path):
    prefix = tmp_path / "locust"
    command = [
        *(sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py")),
        *("--headless", "-u", "8", "-r", "8", "-t", "8s", "--stop-timeout", "5"),
        *("--host", server, "--csv", str(prefix), "--only-summary", "--skip-log-setup"),
        *("--exit-code-on-error", "1"),
    ]
    env = {**locust_env(), "VITSERVE_LOADTEST_MODELS": "tiny,tiny-b"}  # configured by env
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    output = (done.stdout + done.stderr)[-3000:]
    assert Path(f"{prefix}_stats.csv").exists(), (
        f"locust wrote no CSV (rc {done.returncode})\n{output}"
    )

    failures = read_csv(Path(f"{prefix}_failures.csv"))
    server_errors = [f for f in failures if f["Error"].lstrip("'\"").startswith("HTTP 5")]
    assert not server_errors, f"5xx under load: {server_errors}\n{output}"

    stats = read_csv(Path(f"{prefix}_stats.csv"))
    total = next(row for row in stats if row["Name"] == "Aggregated")
    requests, errors = int(total["Request Count"]), int(total["Failure Count"])
    assert requests >= MIN_REQUESTS, output
    assert errors / requests <= MAX_ERROR_RATE, f"{errors}/{requests} failed: {failures}"
    names = {row["Name"] for row in stats}
    assert "/classify?model=tiny-b" in names, names  # the models came from the env
    if requests >= SCENARIO_CHECK_REQUESTS:  # every scenario ran: multi-image and compare
        assert any(n.endswith(" x4") for n in names), names
        assert "/compare" in names, names
    assert done.returncode == 0, output


def test_locustfile_refuses_a_remote_host(tmp_path):
    command = [
        *(sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py")),
        *("--headless", "-u", "1", "-t", "1s", "--host", "http://192.0.2.1:8000"),
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=locust_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "non-loopback" in done.stdout + done.stderr
