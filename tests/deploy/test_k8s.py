"""The Kubernetes manifests under deploy/: built-in kinds against the Kubernetes OpenAPI schemas
(kubernetes-validate, offline, strict: unknown fields are errors) for the oldest and newest versions we
support; custom resources (RayCluster, RayJob, ServiceMonitor) against their required fields and
types, with their pod templates checked as Kubernetes PodTemplateSpecs; then the wiring between
objects: selectors, ports, probes, the ConfigMap against the gateway's settings, the plugin on every
Ray node."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .conftest import REPO, header_comment, load_all
from .crd_schemas import SCHEMAS

K8S_VERSIONS = ("1.30.0", "1.37.0")
DIRS = [REPO / "deploy" / "k8s", REPO / "deploy" / "ray"]
FILES = sorted(p for d in DIRS for p in d.glob("*.yaml"))
DEFAULT_ROPE_THETA = 100000.0  # rope_theta of the default model's config.json


def documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in FILES for doc in load_all(path)]


DOCS = documents()


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def is_builtin(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"], doc["kind"]) not in SCHEMAS and doc["kind"] != "Kustomization"


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every workload, built-in or custom."""
    out = []
    for _, d in DOCS:
        if d["kind"] == "Deployment":
            out.append((d["metadata"]["name"], d["spec"]["template"]))
        elif d["kind"] == "RayCluster":
            out.append((d["metadata"]["name"] + "/head", d["spec"]["headGroupSpec"]["template"]))
            for g in d["spec"].get("workerGroupSpecs", []):
                out.append((d["metadata"]["name"] + "/" + g["groupName"], g["template"]))
    return out


def test_files_found_and_commented():
    assert len(FILES) >= 12
    for path in FILES:
        assert header_comment(path), path
        assert load_all(path), path


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_against_kubernetes_schemas(kubernetes_validate, version):
    checked = 0
    for path, doc in DOCS:
        if is_builtin(doc):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")
            checked += 1
    assert checked >= 10


def test_kubernetes_validate_rejects_a_broken_deployment(kubernetes_validate):
    bad = copy.deepcopy(find("Deployment", "ropeserve-gateway"))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = copy.deepcopy(find("Deployment", "ropeserve-gateway"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # misspelt: strict catches it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_custom_resources_against_their_crds():
    kinds = set()
    for path, doc in DOCS:
        schema = SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            jsonschema.validate(doc, schema)
            kinds.add(doc["kind"])
    assert kinds == {"RayCluster", "RayJob", "ServiceMonitor"}


@pytest.mark.parametrize(
    "kind, breakage",
    [
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName")),
        ("RayCluster", lambda d: d["spec"].pop("headGroupSpec")),
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": 8})),
        ("RayCluster", lambda d: d["spec"].update({"workerGroupSpec": []})),
        ("RayJob", lambda d: d["spec"].pop("clusterSelector")),
        ("RayJob", lambda d: d["spec"].update({"submissionMode": "Batch"})),
        ("ServiceMonitor", lambda d: d["spec"].pop("selector")),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update({"interval": "15 seconds"})),
        ("ServiceMonitor", lambda d: d["spec"].update({"endpoints": []})),
    ],
)
def test_crd_checks_can_fail(kind, breakage):
    doc = copy.deepcopy(find(kind))
    breakage(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMAS[(doc["apiVersion"], kind)])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pod_templates_inside_custom_resources(kubernetes_validate, version):
    for where, template in pod_templates():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            kubernetes_validate.validate(wrapped, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where}: {err.message} at {list(err.path)}")


def test_ray_replicas_consistent():
    for g in find("RayCluster")["spec"]["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]


def test_kustomization_lists_every_manifest():
    (kustomization,) = load_all(REPO / "deploy" / "k8s" / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in (REPO / "deploy" / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    used = {c["image"] for _, t in pod_templates() for c in t["spec"]["containers"]}
    renamed = {i["name"] for i in kustomization["images"]}
    for image in used:
        assert image in renamed or (":" in image and not image.endswith(":latest")), image


def test_everything_in_one_namespace():
    (namespace,) = [d for _, d in DOCS if d["kind"] == "Namespace"]
    for path, doc in DOCS:
        if doc["kind"] not in ("Namespace", "Kustomization"):
            assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], path


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"]


def test_probes_never_touch_the_passkey_route():
    for _, template in pod_templates():
        for c in containers(template):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert "passkey" not in json.dumps(c[probe])
    assert "passkey" not in json.dumps([d for _, d in DOCS])  # nor anything else (comments aside)


def test_gateway_probes_and_settings_sources():
    gateway = find("Deployment", "ropeserve-gateway")
    (c,) = containers(gateway["spec"]["template"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    sources = [next(iter(s.values()))["name"] for s in c["envFrom"]]
    assert sources == ["ropeserve-config", "ropeserve-secrets"]
    assert "env" not in c  # configuration from the one ConfigMap and Secret only
    assert not any(d["kind"] == "Secret" for _, d in DOCS)  # never committed
    assert c["resources"]["requests"]["cpu"]  # the HPA's utilisation needs a request


def test_engine_has_a_gpu_and_the_plugin():
    engine = find("Deployment", "ropeserve-engine")
    (c,) = containers(engine["spec"]["template"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert {"name": "VLLM_PLUGINS", "value": plugin_name()} in c["env"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"


def plugin_name() -> str:
    """The name of our entry point in the `vllm.general_plugins` group (what VLLM_PLUGINS must list)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (name,) = project["entry-points"]["vllm.general_plugins"]
    return name


def test_plugin_on_every_ray_node():
    name = plugin_name()
    for where, template in pod_templates():
        if "/" not in where:
            continue
        for c in containers(template):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("VLLM_PLUGINS") == name, where
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/models" in mounts and "/dev/shm" in mounts, where
    job = find("RayJob")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["VLLM_PLUGINS"] == name


def test_rayjob_runs_vllm_on_the_cluster():
    cluster, job = find("RayCluster"), find("RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("python -m vllm.entrypoints.openai.api_server")
    args = entry.split()
    tp = int(args[args.index("--tensor-parallel-size") + 1])
    pp = int(args[args.index("--pipeline-parallel-size") + 1])
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
               for g in cluster["spec"]["workerGroupSpecs"])
    per_node = {int(g["rayStartParams"]["num-gpus"]) for g in cluster["spec"]["workerGroupSpecs"]}
    assert tp * pp == gpus and per_node == {tp}  # one pipeline stage per node, tensor parallel inside it
    overrides = json.loads(entry.split("--hf-overrides ", 1)[1].strip("'"))
    assert overrides["rope_parameters"]["rope_type"] == "dynamic_yarn"
    max_len = int(args[args.index("--max-model-len") + 1])
    rope = overrides["rope_parameters"]
    assert max_len == overrides["max_position_embeddings"] == rope["factor"] * rope["original_max_position_embeddings"]
    service = find("Service", "ropeserve-ray-engine")
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    head_ports = {p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in head_ports


def test_services_select_pods_and_ports_exist():
    for _, svc in DOCS:
        if svc["kind"] != "Service" or "ray.io/cluster" in svc["spec"]["selector"]:
            continue
        (deployment,) = [d for _, d in DOCS if d["kind"] == "Deployment"
                         and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        port_names = {p["name"] for c in containers(deployment["spec"]["template"]) for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, (svc["metadata"]["name"], port)


def test_hpa_and_pdb_target_the_gateway():
    hpa, pdb = find("HorizontalPodAutoscaler"), find("PodDisruptionBudget")
    gateway = find("Deployment", "ropeserve-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": gateway["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["minAvailable"] + 1
    assert pdb["spec"]["selector"] == gateway["spec"]["selector"]


def test_servicemonitor_scrapes_gateway_and_engine():
    monitor = find("ServiceMonitor")
    selected = [d for _, d in DOCS if d["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()]
    names = {s["metadata"]["name"] for s in selected}
    assert {"ropeserve-gateway", "ropeserve-engine"} <= names
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "engine"}


def test_configmap_is_valid_gateway_settings_and_matches_the_engine(clean_env, monkeypatch):
    from server.engine_process import hf_overrides
    from server.settings import ENV_PREFIX, GatewaySettings

    data = find("ConfigMap", "ropeserve-config")["data"]
    for key, value in data.items():
        if key.startswith(ENV_PREFIX):
            assert key[len(ENV_PREFIX):].lower() in GatewaySettings.model_fields, key
            monkeypatch.setenv(key, value)
        else:
            assert key.startswith("ENGINE_"), key
    settings = GatewaySettings()
    scaling = settings.rope_scaling()
    assert settings.engine_urls == ["http://ropeserve-engine:8001"]
    assert json.loads(data["ENGINE_HF_OVERRIDES"]) == hf_overrides(scaling, DEFAULT_ROPE_THETA)
    assert int(data["ENGINE_MAX_MODEL_LEN"]) == scaling.max_context
    engine = find("Deployment", "ropeserve-engine")
    (c,) = containers(engine["spec"]["template"])
    referenced = {a.split("$(", 1)[1].rstrip(")") for a in c["args"] if "$(" in a}
    assert referenced <= set(data), referenced - set(data)
    svc = find("Service", "ropeserve-engine")
    assert settings.engine_urls[0].endswith(f"//{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}")


def test_pods_run_as_non_root():
    for where, template in pod_templates():
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, where
        assert template["spec"]["securityContext"]["runAsUser"] == 10001, where  # the image's user
        for c in containers(template):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
