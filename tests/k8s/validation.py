"""Offline checks of rendered Kubernetes manifests: schema validation (built-in kinds with
kubernetes-validate --strict, custom resources against the CRDs in ../shared/crds) and consistency with the
code (ports, env names, flags, metric and health service names, drain timing). Each check returns a list
of problems, so a test can assert that the real manifests have none and a broken copy has some."""

from __future__ import annotations

import copy
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# The workplace's reference CRDs when this checkout sits beside them, else the vendored copies (identical):
# a clean checkout elsewhere must validate the same way.
CRDS = next(p for p in (REPO.parent / "shared" / "crds", Path(__file__).resolve().parent / "crds")
            if any(p.glob("*.yaml")))
KUBERNETES_VERSION = "1.32.0"  # the kubectl on the CI image; validate against the API it renders for
GATEWAY = "longbow-gateway"


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: CI needs kubectl >= 1.32 (with kustomize) to render k8s/"
    done = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize k8s/{overlay} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


# ---- schemas -------------------------------------------------------------------------------------
@cache
def _crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _like_the_api_server(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def _like_the_api_server(schema: dict) -> dict:
    """The two adjustments of ../shared/crds/README.md: a property with a default is not required (the
    server defaults it first), and unknown fields are errors where the schema lists properties and does
    not preserve unknown fields (the server would prune them silently, hiding typos)."""
    if isinstance(schema, dict):
        properties = schema.get("properties")
        if isinstance(properties, dict):
            if "required" in schema:
                schema["required"] = [name for name in schema["required"]
                                      if "default" not in properties.get(name, {})]
            if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
                schema["additionalProperties"] = False
        for value in schema.values():
            if isinstance(value, (dict, list)):
                _like_the_api_server(value)
    elif isinstance(schema, list):
        for item in schema:
            _like_the_api_server(item)
    return schema


def schema_problems(doc: dict) -> list[str]:
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    custom = _crd_schemas().get((doc.get("apiVersion"), doc.get("kind")))
    if custom is not None:
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        errors = sorted(jsonschema.Draft7Validator({**custom, "properties": {
            k: v for k, v in custom.get("properties", {}).items() if k not in ("apiVersion", "kind", "metadata")}}
        ).iter_errors(body), key=lambda e: list(e.path))
        return [f"{name}: {'/'.join(map(str, e.path))}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        # NOTE: the CLI exits 0 on kinds it has no schema for; an unvalidated object is a failure here.
        return [f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')} (neither built in nor in {CRDS})"]
    except kubernetes_validate.ValidationError as exc:
        return [f"{name}: {exc.message}"]
    return []


# ---- consistency with the code -------------------------------------------------------------------
def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def gateway_container(docs: list[dict]) -> dict:
    [deployment] = find(docs, "Deployment", GATEWAY)
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    return container


def gateway_toml(docs: list[dict]) -> dict:
    configs = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("longbow-config")]
    assert len(configs) == 1, "expected one longbow-config ConfigMap"
    return tomllib.loads(configs[0]["data"]["longbow.toml"])


def config_problems(docs: list[dict]) -> list[str]:
    """The ConfigMap's TOML loads through the real loader (unknown keys are errors) and every LONGBOW_*
    variable the pods set is one the config module reads."""
    import os
    import tempfile

    from longbow.services import config as config_module

    problems = []
    text = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("longbow-config")][0]["data"]["longbow.toml"]
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        config_module.load_config(f.name)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"longbow.toml: {exc}")
    finally:
        os.unlink(f.name)
    known = set(config_module._ENV_KEYS) | {"LONGBOW_CONFIG", "LONGBOW_HOME"}
    for container in _longbow_containers(docs):
        for env in container.get("env", []):
            if env["name"].startswith("LONGBOW_") and env["name"] not in known:
                problems.append(f"{container['name']}: env {env['name']} is not read by services/config.py")
    return problems


def _longbow_containers(docs: list[dict]) -> list[dict]:
    containers = []
    for doc in docs:
        for spec in _pod_specs(doc):
            containers += [c for c in spec.get("containers", []) if "longbow" in c.get("image", "")]
    return containers


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [spec["template"]["spec"]]
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])]
    return []


def gateway_problems(docs: list[dict]) -> list[str]:
    """Ports, probes, flags and drain timing of the gateway Deployment against the code and its TOML."""
    from longbow.services.cli import build_parser
    from longbow.services.gateway.lifecycle import LIVENESS_SERVICE
    from longbow.services.gateway.server import _service_names

    problems = []
    toml = gateway_toml(docs)["gateway"]
    [deployment] = find(docs, "Deployment", GATEWAY)
    pod = deployment["spec"]["template"]
    container = gateway_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for name, key in (("grpc", "port"), ("health", "health_port"), ("metrics", "metrics_port")):
        if ports.get(name) != toml.get(key):
            problems.append(f"container port {name}={ports.get(name)} but longbow.toml gateway.{key}={toml.get(key)}")
    if str(pod["metadata"].get("annotations", {}).get("prometheus.io/port")) != str(toml.get("metrics_port")):
        problems.append("prometheus.io/port annotation does not match gateway.metrics_port")
    served = set(_service_names()) | {"", LIVENESS_SERVICE}
    expected = {"startupProbe": "longbow.v1.Generation", "readinessProbe": "longbow.v1.Generation",
                "livenessProbe": LIVENESS_SERVICE}
    for probe_name, service in expected.items():
        grpc_probe = container.get(probe_name, {}).get("grpc")
        if not grpc_probe:
            problems.append(f"{probe_name} is not a native gRPC probe")
            continue
        if grpc_probe.get("port") != toml.get("health_port"):
            problems.append(f"{probe_name} port {grpc_probe.get('port')} is not gateway.health_port {toml.get('health_port')}")
        if grpc_probe.get("service", "") not in served or grpc_probe.get("service", "") != service:
            problems.append(f"{probe_name} checks {grpc_probe.get('service')!r}, expected {service!r} (served: {sorted(served)})")
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace < pre_stop + toml.get("shutdown_timeout_s", 30.0):
        problems.append(f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain {toml.get('shutdown_timeout_s')}")
    if "command" in container:
        problems.append("the gateway container overrides the image ENTRYPOINT (longbow); give args only")
    try:
        build_parser().parse_args(container.get("args", []))
    except SystemExit:
        problems.append(f"args {container.get('args')} are not a valid `longbow` command line")
    for service in find(docs, "Service"):
        if service["spec"].get("selector", {}).get("app.kubernetes.io/component") == "gateway":
            for port in service["spec"]["ports"]:
                if port["targetPort"] not in ports:
                    problems.append(f"Service {service['metadata']['name']} targets unknown port {port['targetPort']}")
    return problems


def security_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc in docs:
        for spec in _pod_specs(doc):
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            if not spec.get("securityContext", {}).get("runAsNonRoot"):
                problems.append(f"{name}: pod does not set runAsNonRoot")
            for container in spec.get("containers", []):
                if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{name}/{container['name']}: allowPrivilegeEscalation is not false")
    return problems


def redis_problems(docs: list[dict]) -> list[str]:
    [redis] = find(docs, "StatefulSet", "longbow-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = dict(zip(args, args[1:]))
    problems = []
    if pairs.get("--appendonly") != "yes" or pairs.get("--appendfsync") != "everysec":
        problems.append(f"redis must run with --appendonly yes --appendfsync everysec, got {args}")
    if not redis["spec"].get("volumeClaimTemplates"):
        problems.append("redis has no PersistentVolumeClaim: the AOF would not survive the pod")
    headless = [s for s in find(docs, "Service", redis["spec"]["serviceName"]) if s["spec"].get("clusterIP") == "None"]
    if not headless:
        problems.append("redis serviceName is not a headless Service")
    store_url = gateway_toml(docs).get("rag", {}).get("store_url", "")
    if f"{redis['metadata']['name']}-0.{redis['spec']['serviceName']}:" not in store_url:
        problems.append(f"rag.store_url {store_url!r} does not name the StatefulSet's pod")
    return problems


def policy_problems(docs: list[dict]) -> list[str]:
    problems = []
    deny = [p for p in find(docs, "NetworkPolicy") if p["spec"].get("podSelector") == {}
            and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    if not deny:
        problems.append("no default-deny NetworkPolicy (empty podSelector, Ingress and Egress, no rules)")
    gateway_labels = find(docs, "Deployment", GATEWAY)[0]["spec"]["template"]["metadata"]["labels"]
    pdbs = [p for p in find(docs, "PodDisruptionBudget")
            if p["spec"]["selector"]["matchLabels"].items() <= gateway_labels.items()]
    if not pdbs:
        problems.append("no PodDisruptionBudget selects the gateway pods")
    return problems


def autoscaling_problems(docs: list[dict]) -> list[str]:
    """Every autoscaler targets the gateway and queries metric names the gateway exports."""
    import re

    from longbow.services.gateway.metrics import GatewayMetrics

    exported = {sample.name for metric in GatewayMetrics().registry.collect() for sample in metric.samples}
    exported |= {metric.name for metric in GatewayMetrics().registry.collect()}
    problems = []
    for scaled in find(docs, "ScaledObject"):
        if scaled["spec"]["scaleTargetRef"]["name"] != GATEWAY:
            problems.append(f"ScaledObject targets {scaled['spec']['scaleTargetRef']['name']}, not {GATEWAY}")
        for trigger in scaled["spec"]["triggers"]:
            names = re.findall(r"\b(longbow_[a-z_]+)", trigger["metadata"].get("query", ""))
            if not names:
                problems.append("a ScaledObject trigger queries no longbow_* metric")
            problems += [f"metric {n} is not exported by services/gateway/metrics.py" for n in names if n not in exported]
    return problems


def gpu_problems(docs: list[dict]) -> list[str]:
    problems = []
    [ray] = find(docs, "RayCluster")
    head = ray["spec"]["headGroupSpec"]["rayStartParams"]
    if (head.get("num-cpus"), head.get("num-gpus")) != ("0", "0"):
        problems.append("the Ray head must take no work (num-cpus 0, num-gpus 0)")
    if not ray["spec"].get("enableInTreeAutoscaling"):
        problems.append("RayCluster without in-tree autoscaling")
    for group in ray["spec"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        for container in spec["containers"]:
            if "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}):
                problems.append(f"worker group {group['groupName']}: no nvidia.com/gpu limit")
        shm = [v for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = {m["name"]: m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        if not any(mounts.get(v["name"]) == "/dev/shm" for v in shm):
            problems.append(f"worker group {group['groupName']}: /dev/shm is not a memory emptyDir")
    return problems


ALL_CHECKS = [config_problems, gateway_problems, security_problems, redis_problems, policy_problems,
              autoscaling_problems]
