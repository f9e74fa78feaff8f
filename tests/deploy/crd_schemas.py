"""JSON schemas of the custom resources the manifests use, reduced to what their CRDs require and the
fields' types, written from the upstream API types: KubeRay ``ray.io/v1`` (ray-operator/apis/ray/v1:
RayCluster, RayJob) and the Prometheus Operator's ``monitoring.coreos.com/v1`` ServiceMonitor.
kubernetes-validate ships no CRD schemas; the pod templates inside RayCluster are validated separately
against the Kubernetes PodTemplateSpec schema (test_k8s.py). ``additionalProperties: false`` on the
specs turns a misspelt field into an error instead of a field the operator silently ignores.
"""

from __future__ import annotations

DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": DNS1123, "maxLength": 63},
                           "namespace": {"type": "string", "pattern": DNS1123},
                           "labels": STRING_MAP, "annotations": STRING_MAP}}
POD_TEMPLATE = {"type": "object", "required": ["spec"],
                "properties": {"metadata": {"type": "object"}, "spec": {"type": "object", "required": ["containers"]}}}
REPLICAS = {"type": "integer", "minimum": 0, "maximum": 2147483647}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                           "metadata": METADATA, "spec": spec}}


HEAD_GROUP = {
    "type": "object",
    # rayStartParams: required before KubeRay 1.4, optional since; always written here.
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                   "headService": {"type": "object"}, "enableIngress": {"type": "boolean"},
                   "rayStartParams": STRING_MAP, "template": POD_TEMPLATE},
}
WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {"groupName": {"type": "string", "minLength": 1}, "replicas": REPLICAS,
                   "minReplicas": REPLICAS, "maxReplicas": REPLICAS,
                   "numOfHosts": {"type": "integer", "minimum": 1}, "rayStartParams": STRING_MAP,
                   "template": POD_TEMPLATE, "scaleStrategy": {"type": "object"}, "suspend": {"type": "boolean"},
                   "idleTimeoutSeconds": {"type": "integer"}},
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {"headGroupSpec": HEAD_GROUP, "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
                   "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                   "autoscalerOptions": {"type": "object"}, "headServiceAnnotations": STRING_MAP,
                   "suspend": {"type": "boolean"}, "gcsFaultToleranceOptions": {"type": "object"},
                   "managedBy": {"type": "string"}},
}
RAY_CLUSTER = _resource("ray.io/v1", "RayCluster", RAY_CLUSTER_SPEC)

RAY_JOB = _resource("ray.io/v1", "RayJob", {
    "type": "object",
    "additionalProperties": False,
    # A job runs on a cluster it creates (rayClusterSpec) or on an existing one (clusterSelector).
    "anyOf": [{"required": ["clusterSelector"]}, {"required": ["rayClusterSpec"]}],
    "properties": {"entrypoint": {"type": "string", "minLength": 1}, "clusterSelector": STRING_MAP,
                   "rayClusterSpec": RAY_CLUSTER_SPEC,
                   "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                   "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
                   "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer"},
                   "activeDeadlineSeconds": {"type": "integer"}, "backoffLimit": {"type": "integer"},
                   "suspend": {"type": "boolean"}, "submitterPodTemplate": POD_TEMPLATE,
                   "submitterConfig": {"type": "object"}, "entrypointNumCpus": {"type": "number"},
                   "entrypointNumGpus": {"type": "number"}, "entrypointResources": {"type": "string"},
                   "metadata": STRING_MAP, "managedBy": {"type": "string"}, "deletionPolicy": {"type": "object"}},
})

SECRET_KEY = {"type": "object", "required": ["key"],
              "properties": {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}}
SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object",
    "required": ["selector", "endpoints"],  # endpoints: required upstream until v0.8x, and useless when empty
    "properties": {
        "selector": {"type": "object", "properties": {"matchLabels": STRING_MAP,
                                                       "matchExpressions": {"type": "array"}}},
        "namespaceSelector": {"type": "object", "properties": {"any": {"type": "boolean"},
                                                                "matchNames": {"type": "array",
                                                                               "items": {"type": "string"}}}},
        "jobLabel": {"type": "string"},
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
            "properties": {"port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                           "path": {"type": "string", "pattern": "^/"},
                           "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                           "interval": {"type": "string", "pattern": DURATION},
                           "scrapeTimeout": {"type": "string", "pattern": DURATION},
                           "authorization": {"type": "object", "properties": {"type": {"type": "string"},
                                                                               "credentials": SECRET_KEY}},
                           "bearerTokenSecret": SECRET_KEY}}},
    },
})

SCHEMAS = {("ray.io/v1", "RayCluster"): RAY_CLUSTER, ("ray.io/v1", "RayJob"): RAY_JOB,
           ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR}
