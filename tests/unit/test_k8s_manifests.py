"""deploy/k8s: every manifest passes kubernetes-validate's offline schemas for a pinned Kubernetes
version (strict: unknown fields fail), and the manifests agree with each other and with the image."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app.metrics import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# Where the Dockerfile points the compilation cache.
COMPILE_CACHE_DIR = re.search(r"COMPILE_CACHE_DIR=(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
KUBERNETES_VERSION = "1.33.0"  # the oldest minor the manifests promise to support; see docs/DEPLOY.md
# KServe fields of a predictor that are not PodSpec fields (serving.kserve.io/v1beta1 PredictorSpec).
KSERVE_PREDICTOR_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleMetric",
    "scaleTarget",
    "timeout",
    "containerConcurrency",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "model",
    "annotations",
    "labels",
    "deploymentStrategy",
    "autoScaling",
}


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


KUSTOMIZATION = load(K8S / "kustomization.yaml")[0]
RESOURCES = {doc["kind"]: doc for name in KUSTOMIZATION["resources"] for doc in load(K8S / name)}
DEPLOYMENT = RESOURCES["Deployment"]
POD = DEPLOYMENT["spec"]["template"]
(CONTAINER,) = POD["spec"]["containers"]
(INFERENCE_SERVICE,) = load(K8S / "kserve" / "inferenceservice.yaml")
EXPORTED_METRICS = {sample.name for metric in REGISTRY.collect() for sample in metric.samples} | {
    metric.name for metric in REGISTRY.collect()
}


def env(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def test_kustomization_lists_every_manifest():
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(KUSTOMIZATION["resources"]) == manifests
    assert set(RESOURCES) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


@pytest.mark.parametrize("kind", ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"])
def test_manifest_is_valid_for_the_pinned_kubernetes(kind):
    kubernetes_validate.validate(RESOURCES[kind], KUBERNETES_VERSION, strict=True)


def test_a_broken_manifest_is_rejected():
    """The validator really checks: a misspelt field and a wrong type both fail."""
    broken = yaml.safe_load(yaml.safe_dump(DEPLOYMENT))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(DEPLOYMENT))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_inference_service_predictor_is_a_valid_pod_spec():
    """InferenceService is a KServe CRD with no schema in kubernetes-validate: its predictor minus
    KServe's own fields is a PodSpec, validated as one; the CRD's remaining fields are checked by hand."""
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(INFERENCE_SERVICE, KUBERNETES_VERSION, strict=True)
    assert INFERENCE_SERVICE["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = INFERENCE_SERVICE["spec"]["predictor"]
    pod_spec = {key: value for key, value in predictor.items() if key not in KSERVE_PREDICTOR_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe's name for a custom predictor
    (port,) = container["ports"]
    assert env(container)["PORT"] == str(port["containerPort"])  # the service listens where KServe routes
    assert container["image"] == CONTAINER["image"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert [mount["mountPath"] for mount in container["volumeMounts"]] == ["/tmp", COMPILE_CACHE_DIR]


def test_probes_use_the_health_routes_on_the_served_port():
    (port,) = CONTAINER["ports"]
    assert env(CONTAINER)["PORT"] == str(port["containerPort"])
    assert CONTAINER["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert CONTAINER[probe]["httpGet"]["port"] == port["name"]
    startup = CONTAINER["startupProbe"]
    # Warm-up measured by deploy/container-test.sh: ~15-25 s; the startup probe allows far more.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_pod_is_non_root_read_only_and_unprivileged():
    pod_security, security = POD["spec"]["securityContext"], CONTAINER["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == 10001  # the image's user
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The only writable paths: Python's and TensorFlow's temporary files, and the compilation cache
    # where the image points COMPILE_CACHE_DIR (unwritable, the service would run without it).
    assert [mount["mountPath"] for mount in CONTAINER["volumeMounts"]] == ["/tmp", COMPILE_CACHE_DIR]
    assert {"cpu", "memory"} <= set(CONTAINER["resources"]["requests"]) & set(CONTAINER["resources"]["limits"])


def test_termination_grace_covers_pre_stop_and_both_drains():
    pre_stop_s = int(CONTAINER["lifecycle"]["preStop"]["exec"]["command"][-1])
    shutdown_grace_s = float(env(CONTAINER)["SHUTDOWN_GRACE_S"])
    assert pre_stop_s > 0
    assert POD["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + 2 * shutdown_grace_s


def test_service_pdb_and_hpa_point_at_the_deployment():
    pod_labels = POD["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert RESOURCES["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert RESOURCES["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert RESOURCES["Service"]["spec"]["ports"][0]["targetPort"] == CONTAINER["ports"][0]["name"]
    target = RESOURCES["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])
    assert RESOURCES["PodDisruptionBudget"]["spec"]["minAvailable"] < DEPLOYMENT["spec"]["replicas"]


def test_hpa_queue_metric_is_exported_and_served_by_the_adapter_rule():
    """The base HPA has CPU only: one that cannot read a metric never scales down. The adapter's
    overlay adds the queue metric, which the service exports and the adapter's rule serves."""
    hpa = RESOURCES["HorizontalPodAutoscaler"]["spec"]
    assert [metric["resource"]["name"] for metric in hpa["metrics"]] == ["cpu"]
    overlay = load(K8S.parent / "k8s-adapter" / "kustomization.yaml")[0]
    assert overlay["resources"] == ["../k8s"]
    (patch,) = overlay["patches"]
    assert patch["target"] == {
        "kind": "HorizontalPodAutoscaler",
        "name": RESOURCES["HorizontalPodAutoscaler"]["metadata"]["name"],
    }
    (operation,) = yaml.safe_load(patch["patch"])
    assert (operation["op"], operation["path"], operation["value"]["type"]) == ("add", "/spec/metrics/-", "Pods")
    queue_metric = operation["value"]["pods"]["metric"]["name"]
    assert queue_metric in EXPORTED_METRICS
    adapter = yaml.safe_load((K8S.parent / "k8s-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == queue_metric
    assert re.fullmatch(rule["name"]["matches"], queue_metric)
    assert rule["seriesQuery"].startswith(queue_metric + "{")


def test_prometheus_annotations_match_the_port():
    annotations = POD["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(CONTAINER["ports"][0]["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_tmp_holds_every_upload_the_service_admits_at_once():
    """Starlette spools form files over 1 MB to /tmp; a pod whose emptyDir outgrows its sizeLimit is
    evicted, dropping every request it serves."""
    from app.settings import Settings

    units = {"Mi": 2**20, "Gi": 2**30}
    for pod in (POD["spec"], INFERENCE_SERVICE["spec"]["predictor"]):
        (container,) = pod["containers"]
        configured = {name.lower(): value for name, value in env(container).items() if value is not None}
        settings = Settings(
            **{k: v for k, v in configured.items() if k in ("max_concurrent_uploads", "max_upload_bytes")}
        )
        (tmp,) = [volume for volume in pod["volumes"] if volume["name"] == "tmp"]
        size = tmp["emptyDir"]["sizeLimit"]
        assert int(size[:-2]) * units[size[-2:]] >= settings.max_concurrent_uploads * settings.max_upload_bytes


def client_seen(trusted: str, peer: str, forwarded_for: str | None) -> str:
    """The client address the app gets from uvicorn's own proxy-header handling."""
    seen = {}

    async def app(scope, receive, send):
        seen["client"] = scope["client"][0]

    headers = [] if forwarded_for is None else [(b"x-forwarded-for", forwarded_for.encode())]
    scope = {"type": "http", "client": (peer, 40000), "headers": headers, "scheme": "http"}
    asyncio.run(ProxyHeadersMiddleware(app, trusted_hosts=trusted)(scope, None, None))
    return seen["client"]


def test_behind_the_ingress_or_knative_each_client_keeps_its_own_address():
    """The limits per client address need the client's address, not a proxy's: through an ingress
    controller (a pod address) or Knative's gateway, activator and queue-proxy, each appending the
    address it received from, the app must see the address the first proxy received from."""
    trusted = env(CONTAINER)["FORWARDED_ALLOW_IPS"]
    (predictor,) = INFERENCE_SERVICE["spec"]["predictor"]["containers"]
    assert env(predictor)["FORWARDED_ALLOW_IPS"] == trusted
    # ingress-nginx at 10.8.3.3 sets X-Forwarded-For to the address it received from
    assert client_seen(trusted, "10.8.3.3", "198.51.100.2") == "198.51.100.2"
    # Knative: the gateway appends the client, the activator the gateway's address (10.8.1.4), and
    # queue-proxy (the peer, 127.0.0.1) the activator's (10.8.2.9)
    assert client_seen(trusted, "127.0.0.1", "203.0.113.7, 10.8.1.4, 10.8.2.9") == "203.0.113.7"
    # a client's own X-Forwarded-For is kept in front, and is not believed
    assert client_seen(trusted, "127.0.0.1", "192.0.2.1, 203.0.113.7, 10.8.1.4") == "203.0.113.7"
    # a client reaching the pod directly from outside the pod networks cannot claim another address
    assert client_seen(trusted, "203.0.113.9", "192.0.2.1") == "203.0.113.9"
    assert client_seen(trusted, "fd12::5", "2001:db8::7, fd12::9") == "2001:db8::7"
    # uvicorn's default (127.0.0.1 only) would give every client the activator's address
    assert client_seen("127.0.0.1", "127.0.0.1", "203.0.113.7, 10.8.1.4, 10.8.2.9") == "10.8.2.9"
