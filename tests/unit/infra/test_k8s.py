"""The Kubernetes manifests (infra/k8s: kustomize base and overlays) hold together without a cluster: each overlay
renders (infra.k8s.render, the same output as `kubectl kustomize` where kubectl exists), every object validates
against the Kubernetes 1.32 OpenAPI schemas (kubernetes-validate, strict) or, for KEDA, the Prometheus operator
and cert-manager, against models generated from their CRD schemas (cloudcoil-models-*), every flag and
FLEETSERVE_*/OTEL_* variable a container gets is a real setting of that service (and parses), and what the
objects refer to exists. Validated, not deployed: no cluster runs here."""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infra.k8s.render import render
from services.autoscaler.config import AutoscalerSettings
from services.engine.config import EngineSettings
from services.gateway.config import GatewaySettings
from services.metrics.config import MetricsSettings
from services.registry.config import RegistrySettings
from services.router.config import RouterSettings
from shared import tls as shared_tls
from shared.settings import load_settings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "infra" / "k8s"
TREES = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "production": K8S / "overlays" / "production"}
KUBERNETES_VERSION = "1.32.0"
SETTINGS = {
    "gateway": GatewaySettings,
    "router": RouterSettings,
    "engine": EngineSettings,
    "registry": RegistrySettings,
    "metrics": MetricsSettings,
    "autoscaler": AutoscalerSettings,
}
# The standard OpenTelemetry variables the services honour (shared/otel_export.py, docs/configuration.md).
OTEL_VARIABLES = {
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
}
# Made outside the manifests (docs/deployment.md#deploying-on-kubernetes): production's Secret and model volume.
EXTERNAL = {
    "base": {("Secret", "fleetserve-secrets")},  # each overlay supplies it
    "production": {("Secret", "fleetserve-secrets"), ("PersistentVolumeClaim", "fleetserve-models")},
}


@functools.cache
def _rendered(tree: str) -> str:
    return json.dumps(render(TREES[tree]))


def rendered(tree: str) -> list[dict]:
    """The objects of one tree (a fresh copy: tests may change them)."""
    return json.loads(_rendered(tree))


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def containers(objects: list[dict]):
    """(workload, pod spec, container) of every Deployment and StatefulSet."""
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            pod = o["spec"]["template"]["spec"]
            for c in pod["containers"]:
                yield o, pod, c


def fleet_containers(objects: list[dict]):
    """Containers that run a fleetserve service: (service name, workload, pod spec, container, its flags)."""
    for o, pod, c in containers(objects):
        args = c.get("args") or []
        if "-m" in args and args[args.index("-m") + 1].startswith("services."):
            i = args.index("-m")
            yield args[i + 1].removeprefix("services."), o, pod, c, args[i + 2 :]


@pytest.mark.parametrize("tree", TREES)
def test_the_renderer_matches_kubectl_kustomize(tree):
    """The Python renderer produces exactly what kustomize (inside kubectl) does, object for object."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its kustomize) is not installed: the Python renderer is checked elsewhere")
    out = subprocess.run([kubectl, "kustomize", str(TREES[tree])], capture_output=True, text=True, check=True)
    theirs = [o for o in yaml.safe_load_all(out.stdout) if o]

    def key(o):
        return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])

    assert {key(o): o for o in rendered(tree)} == {key(o): o for o in theirs}


# Custom resources: JSON schemas generated from their CRDs (infra/k8s/schemas/generate.py says from what).
SCHEMAS = K8S / "schemas"


def validate(obj: dict) -> None:
    """Raise (kubernetes_validate.ValidationError or jsonschema.ValidationError) if obj breaks its schema: Kubernetes
    kinds against the 1.32 OpenAPI schemas in strict mode, custom resources against their CRD schemas; unknown
    fields are errors either way."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        path = SCHEMAS / f"{obj['apiVersion'].replace('/', '_')}_{obj['kind']}.json"
        assert path.exists(), f"no schema for {obj['apiVersion']} {obj['kind']}"
        jsonschema.validators.Draft202012Validator(json.loads(path.read_text())).validate(obj)


@pytest.mark.parametrize("tree", TREES)
def test_every_object_validates_against_its_schema(tree):
    """Every rendered object, Kubernetes kinds and custom resources (KEDA, Prometheus operator, cert-manager)."""
    for obj in rendered(tree):
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            raise AssertionError(f"{tree}: {obj['kind']}/{obj['metadata']['name']}: {e.message}") from None


@pytest.mark.parametrize(
    "kind, path, value",
    [
        ("Deployment", ("spec", "replica"), 2),  # a misspelt field
        ("Deployment", ("spec", "replicas"), "two"),  # a wrong type
        ("ScaledObject", ("spec", "minReplicaCont"), 0),
        ("ScaledObject", ("spec", "maxReplicaCount"), "many"),
        ("ServiceMonitor", ("spec", "endpoint"), []),
        ("Certificate", ("spec", "dnsName"), ["x"]),
    ],
)
def test_the_schemas_refuse_a_misspelt_field_and_a_wrong_type(kind, path, value):
    """The checks can fail: one rendered object of each kind, spoilt in one place, is refused."""
    obj = copy.deepcopy(next(o for o in rendered("production") if o["kind"] == kind))
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate(obj)


def _env_value(env: dict, objects: list[dict], tree: str) -> str | None:
    """A container variable's value as the pod would see it (a secret from the overlay, else a realistic one)."""
    if "value" in env:
        return str(env["value"])
    ref = env["valueFrom"]
    if "fieldRef" in ref:
        return {"status.podIP": "10.1.2.3", "metadata.name": "pod-abc"}[ref["fieldRef"]["fieldPath"]]
    key = ref["secretKeyRef"]
    for s in by_kind(objects, "Secret"):
        if s["metadata"]["name"] == key["name"]:
            if key["key"] not in s["stringData"]:
                assert key.get("optional"), f"{tree}: Secret {key['name']} has no {key['key']}"
                return None
            return s["stringData"][key["key"]]
    assert ("Secret", key["name"]) in EXTERNAL.get(tree, set()), f"{tree}: no Secret {key['name']}"
    return {
        "db-url": "postgresql://fleetserve:pw@db.example:5432/fleetserve",
        "redis-url": "rediss://redis.example:6380/0",
    }.get(key["key"], "fsk-placeholder")


def _environment(container: dict, objects: list[dict], tree: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        (cm,) = [
            o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == src["configMapRef"]["name"]
        ]
        env.update(cm["data"])
    for e in container.get("env", []):
        value = _env_value(e, objects, tree)
        if value is not None:  # an optional secret key that is absent: the pod has no such variable
            env[e["name"]] = value
    return env


@pytest.mark.parametrize("tree", TREES)
def test_every_flag_and_variable_is_a_real_setting_and_parses(tree, tmp_path, monkeypatch):
    """Each fleetserve container's flags and environment load with its service's own settings (values
    validated too); every FLEETSERVE_<SERVICE>_<FIELD> variable, for whichever service, names a real field;
    the rest are the tools' FLEETSERVE_TLS_* or the standard OTEL_* variables the services honour."""
    objects = rendered(tree)
    seen = set()
    for service, _, _, c, flags in fleet_containers(objects):
        seen.add(service)
        env = _environment(c, objects, tree)
        for name in env:
            if name.startswith("OTEL_"):
                assert name in OTEL_VARIABLES, f"{tree}/{service}: {name} is not honoured"
            elif name.startswith("FLEETSERVE_TLS_"):
                assert name in (
                    shared_tls.ENV_CERT,
                    shared_tls.ENV_KEY,
                    shared_tls.ENV_CA,
                    shared_tls.ENV_SERVER_NAME,
                )
            else:
                svc, field = next(
                    (s, name.removeprefix(f"FLEETSERVE_{s.upper()}_").lower())
                    for s in SETTINGS
                    if name.startswith(f"FLEETSERVE_{s.upper()}_")
                )
                assert field in SETTINGS[svc].model_fields, f"{tree}: {name} is not a setting of {svc}"
        # The autoscaler's model file comes from its ConfigMap, mounted at /etc/fleetserve.
        for cm in by_kind(objects, "ConfigMap"):
            for fname, text in cm["data"].items():
                if fname.endswith(".json"):
                    (tmp_path / fname).write_text(text)
        flags = [f.replace("/etc/fleetserve/", f"{tmp_path}/") for f in flags]
        for name in [n for n in list(os.environ) if n.startswith(("FLEETSERVE_", "OTEL_"))]:
            monkeypatch.delenv(name)
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            settings = load_settings(SETTINGS[service], flags)
        assert settings.host == "0.0.0.0" and settings.metrics_port == 9400, f"{tree}/{service}"
    assert seen == set(SETTINGS)


@pytest.mark.parametrize("tree", TREES)
def test_references_resolve(tree):
    """Services select pods that exist and expose the ports they target; ConfigMaps, Secrets and volumes named
    by pods exist (or are documented as made outside); PDBs, the HPA and ScaledObjects target real workloads."""
    objects = rendered(tree)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects} | EXTERNAL.get(tree, set())
    pods = [(o["spec"]["template"]["metadata"]["labels"], pod) for o, pod, _ in containers(objects)]
    for svc in by_kind(objects, "Service"):
        sel = svc["spec"]["selector"]
        matching = [pod for labels, pod in pods if sel.items() <= labels.items()]
        assert matching, f"{tree}: Service {svc['metadata']['name']} selects no pod"
        ports = {p["name"] for pod in matching for c in pod["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (
                f"{tree}: {svc['metadata']['name']} targets no port {p['targetPort']}"
            )
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= labels.items() for labels, _ in pods), pdb["metadata"]["name"]
    for o, pod, c in containers(objects):
        for src in c.get("envFrom", []):
            assert ("ConfigMap", src["configMapRef"]["name"]) in names
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                assert ("Secret", ref["name"]) in names, (
                    f"{tree}: {o['metadata']['name']} needs Secret {ref['name']}"
                )
        for v in pod.get("volumes", []):
            for kind, field, key in (
                ("ConfigMap", "configMap", "name"),
                ("Secret", "secret", "secretName"),
                ("PersistentVolumeClaim", "persistentVolumeClaim", "claimName"),
            ):
                if field in v:
                    wanted = v[field][key]
                    made_by_cert_manager = any(
                        c_["spec"]["secretName"] == wanted for c_ in by_kind(objects, "Certificate")
                    )
                    assert (kind, wanted) in names or made_by_cert_manager, f"{tree}: no {kind} {wanted}"
    workloads = {o["metadata"]["name"] for o in by_kind(objects, "Deployment")}
    for target in [
        h["spec"]["scaleTargetRef"]["name"] for h in by_kind(objects, "HorizontalPodAutoscaler")
    ] + [s["spec"]["scaleTargetRef"]["name"] for s in by_kind(objects, "ScaledObject")]:
        assert target in workloads


@pytest.mark.parametrize("tree", TREES)
def test_fleet_pods_probe_drain_and_are_budgeted(tree):
    """Every fleetserve container has a readiness probe (gRPC health, or the TLS exec probe), its pod's grace
    period outlasts the service's own drain (--grace-period-s plus preStop), the serving tiers have disruption
    budgets, the ServiceMonitor finds a metrics port on the fleet's Services, and GPU engines ask for a GPU."""
    objects = rendered(tree)
    budgeted = [p["spec"]["selector"]["matchLabels"] for p in by_kind(objects, "PodDisruptionBudget")]
    for service, o, pod, c, flags in fleet_containers(objects):
        probe = c["readinessProbe"]
        if "exec" in probe:
            assert probe["exec"]["command"][1:3] == ["-m", "shared.health"] and "grpc" not in probe
        else:
            assert probe["grpc"]["port"] in {p["containerPort"] for p in c["ports"]}
        given = [float(f.split("=")[1]) for f in flags if f.startswith("--grace-period-s=")]
        grace = given[0] if given else SETTINGS[service].model_fields["grace_period_s"].default
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_s = float(pre[1]) if pre[:1] == ["sleep"] else 0.0
        assert pod["terminationGracePeriodSeconds"] > grace + pre_s, o["metadata"]["name"]
        labels = o["spec"]["template"]["metadata"]["labels"]
        if service in ("gateway", "router", "engine", "registry"):
            assert any(b.items() <= labels.items() for b in budgeted), (
                f"{tree}: no PDB for {o['metadata']['name']}"
            )
        if "--backend=vllm" in flags:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    (monitor,) = by_kind(objects, "ServiceMonitor")
    selected = [
        s
        for s in by_kind(objects, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    want = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert len(selected) >= 5
    for s in selected:
        assert want <= {p["name"] for p in s["spec"]["ports"]}, s["metadata"]["name"]


def test_production_runs_tls_everywhere_with_certificates_for_every_service():
    """Every production fleet container names its certificate, key, CA and the shared server name, mounted
    from a Secret that a cert-manager Certificate (both usages) fills."""
    objects = rendered("production")
    certs = {c["spec"]["secretName"]: c for c in by_kind(objects, "Certificate")}
    for service, _, pod, c, _ in fleet_containers(objects):
        env = {e["name"]: e.get("value") for e in c["env"]}
        prefix = f"FLEETSERVE_{service.upper()}_TLS_"
        assert env[prefix + "CERT"] == "/etc/fleetserve/tls/tls.crt"
        assert env[prefix + "CA"] == "/etc/fleetserve/tls/ca.crt"
        (vol,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        cert = certs[vol["secret"]["secretName"]]
        assert env[prefix + "SERVER_NAME"] in cert["spec"]["dnsNames"]
        assert {"server auth", "client auth"} <= set(cert["spec"]["usages"])
        assert "127.0.0.1" in cert["spec"]["ipAddresses"]  # the exec probe dials loopback
