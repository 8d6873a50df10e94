"""The Kubernetes autoscaling manifests (in infra/k8s/base: the engine Deployment, the autoscaler and its ConfigMap,
the KEDA ScaledObject) hold together without a cluster: each parses,
has the fields KEDA and Kubernetes require, the ScaledObject targets the engine Deployment and queries the
metric the autoscaler really exports, and every flag the containers pass is a real setting of that service
(and the autoscaler's model config parses). Validated, not deployed."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from services.autoscaler.config import AutoscalerSettings
from services.autoscaler.loop import DESIRED
from services.autoscaler.spec import parse_models
from services.engine.config import EngineSettings
from shared.settings import load_settings

BASE = Path(__file__).resolve().parents[3] / "infra" / "k8s" / "base"
AUTOSCALING = ("engine-sim-1b.yaml", "autoscaler.yaml", "keda-scaledobject.yaml")


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]


def by_kind(kind: str) -> list[dict]:
    return [d for f in AUTOSCALING for d in docs(f) if d["kind"] == kind]


def test_every_object_has_api_version_kind_and_name():
    for f in AUTOSCALING:
        for d in docs(f):
            assert {"apiVersion", "kind", "metadata"} <= set(d), f
            assert d["metadata"].get("name"), f


def test_scaled_object_scales_the_engine_deployment_on_the_desired_replicas_gauge():
    """The trigger reads fleetserve:autoscaler_desired_replicas (the gauge the autoscaler exports) of one model
    version as a Value with threshold 1, so replicas = desired; its target is a Deployment of that version
    defined beside it."""
    (so,) = by_kind("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    assert target["kind"] == "Deployment" and target["name"] in deployments
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    meta = trigger["metadata"]
    assert DESIRED._name in meta["query"], "the query must read the gauge the autoscaler exports"
    assert float(meta["threshold"]) == 1.0
    assert meta["serverAddress"].startswith("http")
    model = so["metadata"]["labels"]["fleetserve/model"]
    version = so["metadata"]["labels"]["fleetserve/model-version"]
    assert f'model_name="{model}"' in meta["query"] and f'version="{version}"' in meta["query"]
    assert "version" in DESIRED._labelnames
    engine = deployments[target["name"]]["spec"]["template"]["spec"]["containers"][0]
    assert f"--model={model}" in engine["args"] and f"--model-version={version}" in engine["args"]


def _flags(container: dict) -> list[str]:
    args = container["args"]
    i = args.index("-m")
    return args[i + 2 :]


@pytest.mark.parametrize(
    "service, settings", [("services.engine", EngineSettings), ("services.autoscaler", AutoscalerSettings)]
)
def test_container_flags_are_real_settings(service, settings, tmp_path, monkeypatch):
    """Every flag a container passes parses with the service's own settings (the autoscaler's --models file
    comes from the ConfigMap beside it)."""
    (cm,) = by_kind("ConfigMap")
    config = tmp_path / "autoscaling.json"
    config.write_text(cm["data"]["autoscaling.json"])
    parse_models(str(config))
    for d in by_kind("Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if service not in c["args"]:
                continue
            flags = [f.replace("/etc/fleetserve/autoscaling.json", str(config)) for f in _flags(c)]
            for env in c.get("env", []):
                monkeypatch.setenv(env["name"], "10.0.0.1")
            load_settings(settings, shlex.split(shlex.join(flags)))


def test_engine_grace_fits_the_termination_grace():
    """Kubernetes kills a pod at terminationGracePeriodSeconds: the engine's drain must finish before."""
    for d in by_kind("Deployment"):
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        grace = [a for a in c["args"] if a.startswith("--grace-period-s=")]
        if grace:
            assert pod["terminationGracePeriodSeconds"] > float(grace[0].split("=")[1])
