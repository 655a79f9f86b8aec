"""Every query of the Grafana dashboard returns data from a real Prometheus.

A Prometheus (Debian package ``prometheus``) scrapes the experiment server on loopback
every second, with the scrape job of monitoring/prometheus.yml; the test drives traffic of
every kind the dashboard shows, then runs each panel's PromQL through /api/v1/query.
Panels whose description starts with "GPU only" may be empty, unless CUDA is present.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from app.bench.server import free_port
from tests.conftest import STICKY_HEADER
from tests.helpers import REPO, image_bytes

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="needs the prometheus binary (apt-get install -y prometheus)",
)
DASHBOARD = REPO / "monitoring" / "grafana" / "dashboards" / "vitserve.json"
# Grafana's variables, as the dashboard's defaults resolve them ("All" variants)
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$model": ".*"}
SCRAPE_S = 1


@contextmanager
def running_prometheus(target: str, workdir: Path) -> Iterator[str]:
    """Prometheus scraping ``target`` with the repo's vitserve job, on a loopback port."""
    config = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vitserve"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": "1s"}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready in 30s"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def has_finite_value(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def drive_load(base: str) -> None:
    """A burst of every kind of traffic the dashboard shows."""
    jpeg = {"content-type": "image/jpeg"}
    data = image_bytes("JPEG", (48, 48))
    three = [("file", (f"{i}.png", image_bytes("PNG", seed=i), "image/png")) for i in range(3)]

    async def main() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            calls = [
                *(http.post("/classify", content=data, headers=jpeg) for _ in range(30)),
                *(
                    http.post("/classify", content=data, headers={**jpeg, STICKY_HEADER: f"c{i}"})
                    for i in range(10)
                ),
                *(
                    http.post("/classify", params={"model": m}, content=data, headers=jpeg)
                    for m in ("tiny", "tiny-b", "tiny-c")
                    for _ in range(8)
                ),
                http.post("/classify", params={"model": "tiny"}, files=three),  # shadow drop
                *(
                    http.post("/compare", params={"models": m}, content=data, headers=jpeg)
                    for m in ("tiny,tiny-b", "tiny,tiny-b,tiny-c", "tiny,absent")
                    for _ in range(3)
                ),
                http.post("/classify", content=b"not an image", headers=jpeg),
                http.post("/classify", params={"model": "nope"}, content=data, headers=jpeg),
                http.post("/classify", params={"top_k": 0}, content=data, headers=jpeg),
            ]
            await asyncio.gather(*calls)

    asyncio.run(main())


def dashboard_queries() -> list[tuple[dict, str]]:
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unresolved variable in {expr}"
            out.append((panel, expr))
    return out


def test_every_dashboard_query_returns_data(experiment_server, tmp_path):
    target = experiment_server.base.removeprefix("http://")
    with running_prometheus(target, tmp_path) as prometheus:
        deadline = time.monotonic() + 30
        while not [s for s in query(prometheus, 'up{job="vitserve"}') if s["value"][1] == "1"]:
            assert time.monotonic() < deadline, "prometheus never scraped vitserve"
            time.sleep(0.2)
        # twice, a few scrapes apart: series born in the first burst grow in the second,
        # so every rate over the window is positive
        drive_load(experiment_server.base)
        time.sleep(3 * SCRAPE_S)
        drive_load(experiment_server.base)
        time.sleep(3 * SCRAPE_S)

        queries = dashboard_queries()
        required = [
            (p, e)
            for p, e in queries
            if torch.cuda.is_available() or not p["description"].startswith("GPU only")
        ]
        assert len(required) >= 20
        deadline = time.monotonic() + 20
        while True:
            empty = [
                f"{p['title']}: {e}"
                for p, e in required
                if not has_finite_value(query(prometheus, e))
            ]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(SCRAPE_S)
        assert not empty, "queries without data:\n" + "\n".join(empty)

        models = query(prometheus, "vitserve_model_info")
        assert {s["metric"]["model"] for s in models} == {"tiny", "tiny-b", "tiny-c"}
        ab = query(prometheus, "sum by (model) (increase(vitserve_ab_assignments_total[1m]))")
        assert {s["metric"]["model"] for s in ab if float(s["value"][1]) > 0} == {
            "tiny",
            "tiny-b",
        }
