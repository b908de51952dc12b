"""The deploy files are checked here because no Docker engine or cluster runs on the CI
machines: Kubernetes objects against the Kubernetes API's own schemas (kubernetes-validate,
offline), the KEDA object, the compose file and the Dockerfile structurally, and every
setting they rely on against the code that reads it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from saliency_audit.service.config import PREFIX, Config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


DOCS = documents()
CORE = [(f, d) for f, d in DOCS if not d["apiVersion"].startswith("keda.sh/")]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == kind}


@pytest.mark.parametrize(
    ("filename", "doc"), CORE, ids=[f"{f}:{d['kind']}:{d['metadata']['name']}" for f, d in CORE]
)
def test_kubernetes_objects_match_the_api_schema(filename: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_setting_in_the_configmap_is_one_the_service_reads() -> None:
    config = by_kind("ConfigMap")["saliency-audit-config"]["data"]
    known = {PREFIX + name.upper() for name in Config.__dataclass_fields__}
    assert set(config) <= known, set(config) - known
    Config.from_env(config)  # parses
    secret = by_kind("Secret")["saliency-audit-secrets"]["stringData"]
    assert set(secret) == {"DATABASE_URL", "BROKER_URL"}


def test_gpu_workers_hold_a_gpu_and_outlive_the_hard_time_limit() -> None:
    config = Config.from_env(by_kind("ConfigMap")["saliency-audit-config"]["data"])
    worker = by_kind("Deployment")["saliency-audit-gpu-worker"]["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= config.hard_time_limit_s
    (container,) = worker["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    command = container["command"]
    assert command[command.index("-Q") + 1] == config.queue
    assert command[command.index("--concurrency") + 1] == "1"
    assert "prefork" in command
    cpu = by_kind("Deployment")["saliency-audit-cpu-worker"]["spec"]["template"]["spec"]
    cpu_command = cpu["containers"][0]["command"]
    assert cpu_command[cpu_command.index("-Q") + 1] == config.cpu_queue
    assert "nvidia.com/gpu" not in str(cpu["containers"][0]["resources"])


def test_the_workers_grace_periods_outlast_the_drain_grace() -> None:
    """Kubernetes and docker kill a GPU worker still draining when their grace period ends,
    which would count the running audit's attempt as a crash: each must give the worker the
    drain grace, a heartbeat to notice it and the time to hand the audit back and exit."""
    settings = by_kind("ConfigMap")["saliency-audit-config"]["data"]
    assert "SALIENCY_AUDIT_DRAIN_GRACE_S" in settings  # stated beside the grace period
    config = Config.from_env(settings)
    worker = by_kind("Deployment")["saliency-audit-gpu-worker"]["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= config.shutdown_grace_s
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    compose_config = Config.from_env(compose["services"]["gpu-worker"]["environment"])
    assert compose_config.drain_grace_s == config.drain_grace_s
    grace_s = compose_duration_s(compose["services"]["gpu-worker"]["stop_grace_period"])
    assert grace_s >= compose_config.shutdown_grace_s


def compose_duration_s(text: str) -> int:
    """A compose duration such as ``3h10m`` or ``90s``, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(int(n) * units[u] for n, u in parts)


def test_keda_scales_the_gpu_workers_on_the_gpu_queue_with_a_long_cooldown() -> None:
    (scaled,) = [d for _, d in DOCS if d["kind"] == "ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] in by_kind("Deployment")
    assert spec["cooldownPeriod"] >= 600
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    config = Config.from_env(by_kind("ConfigMap")["saliency-audit-config"]["data"])
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == config.queue


def test_every_pod_mounts_the_artifacts_and_reads_the_config() -> None:
    claim = next(iter(by_kind("PersistentVolumeClaim")))
    for name, deployment in {**by_kind("Deployment"), **by_kind("Job")}.items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
            assert refs == {"saliency-audit-config", "saliency-audit-secrets"}, name
        if name.endswith(("api", "worker")):
            volumes = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
            assert volumes == {claim}, name


def test_compose_runs_the_production_shape() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {
        "api",
        "gpu-worker",
        "cpu-worker",
        "redis",
        "postgres",
        "migrate",
        "reconciler",
    }
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    assert services["migrate"]["command"] == ["saliency-audit", "db", "upgrade"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    (device,) = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "devices" not in str(services["cpu-worker"].get("deploy", {}))
    env = services["api"]["environment"]
    assert env["DATABASE_URL"].startswith("postgresql://") and env["BROKER_URL"].startswith(
        "redis://"
    )
    config = Config.from_env(env)
    grace = services["gpu-worker"]["stop_grace_period"]
    hours, minutes = (int(x) for x in re.fullmatch(r"(\d+)h(\d+)m", grace).groups())  # type: ignore[union-attr]
    assert hours * 3600 + minutes * 60 >= config.hard_time_limit_s


def test_the_dockerfile_builds_a_torch_free_api_and_a_cuda_worker() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.M))
    stages = {name: image for image, name in stages.items()}
    assert {"api", "worker"} <= set(stages)
    assert stages["worker"].startswith("nvidia/cuda:")
    api_stage = text.split("AS api", 1)[1].split("\nFROM ", 1)[0]
    installs = re.findall(r"pip install ([^\n\\]+)", api_stage)
    assert installs and all("worker" not in line and "timm" not in line for line in installs)
    worker_stage = text.split("AS worker", 1)[1]
    # the worker loads `timm:NAME` architectures; the API only checks the name's syntax
    assert "'.[api,worker,timm]'" in worker_stage
    assert '"celery", "-A", "saliency_audit.workers", "worker", "-Q", "gpu"' in worker_stage
